"""Negative generator training: ``accelerate launch gen_train.py [--config configs/demo.yaml] [--flag value ...]``.

With no arguments it runs ``configs/demo.yaml``: phantoms are generated into ``data/phantoms`` if absent,
the tiny inpainting preset is trained with Diffusion-DPO + LoRA, and outputs land in outputs/generator/demo.
"""

import sys

from negdpo.generator.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
