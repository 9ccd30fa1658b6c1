"""Prompt-generator training (stage 2): ``accelerate launch seg_train.py [--config configs/seg_demo.yaml] [--flag value ...]``.

With no arguments it runs ``configs/seg_demo.yaml``: phantoms are generated next to the output folder if
absent, a MaskSAM-style prompt generator is trained on the tiny SAM preset with their ground-truth masks,
and outputs land in outputs/segmentation/seg_demo. ``--targets EVAL_OUT`` trains on the pseudo-labels of a
``negdpo evaluate`` run instead.
"""

import sys

from negdpo.segmentation.prompt_free.train import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
