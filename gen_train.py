"""Negative generator training: ``accelerate launch gen_train.py [--config configs/demo.yaml] [--flag value ...]``.

With no arguments it runs ``configs/demo.yaml``: phantoms are generated into ``data/phantoms`` if absent,
the tiny inpainting preset is trained with Diffusion-DPO + LoRA, and outputs land in outputs/generator/demo.
``--train_method onpolicy`` runs the twin-free on-policy rounds of :mod:`negdpo.onpolicy`.
"""

import sys

from negdpo.generator.cli import main

from negdpo.onpolicy import run_onpolicy

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], onpolicy=run_onpolicy))
