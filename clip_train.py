"""CLIP preference training: ``accelerate launch clip_train.py [--config configs/clip_demo.yaml] [--flag value ...]``."""

import sys

from negdpo.preference.clip.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
