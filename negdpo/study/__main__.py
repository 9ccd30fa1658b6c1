from negdpo.study.cli import main

raise SystemExit(main())
