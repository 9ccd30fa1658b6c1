"""Entry point: ``accelerate launch clip_train.py [--config configs/clip_demo.yaml] [--flag value ...]``."""

import os
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from negdpo.preference.clip.train import main  # noqa: E402

if __name__ == "__main__":
    main(sys.argv[1:])
    sys.exit(0)
