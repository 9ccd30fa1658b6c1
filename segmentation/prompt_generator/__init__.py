"""Prompt-free SAM (MaskSAM-style prompt generator): the weakly supervised stage 2 of MedCLIP-SAMv2."""

from .inference import PromptGeneratorSegmenter, load_prompt_generator, save_prompt_generator
from .matching import LossWeights, hungarian_match, match_cost, set_loss
from .model import GeneratorConfig, PromptSAM

__all__ = ["GeneratorConfig", "LossWeights", "PromptGeneratorSegmenter", "PromptSAM", "hungarian_match",
           "load_prompt_generator", "match_cost", "save_prompt_generator", "set_loss"]
