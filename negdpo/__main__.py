from negdpo.cli import main

raise SystemExit(main())
