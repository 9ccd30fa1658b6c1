"""Prompt-free SAM (MaskSAM-style prompt generator): the weakly supervised stage 2 of MedCLIP-SAMv2."""

from .inference import PromptFreeSegmenter, load_prompt_free, save_prompt_free
from .matching import LossWeights, hungarian_match, match_cost, set_loss
from .model import PromptFreeConfig, PromptSAM

__all__ = ["LossWeights", "PromptFreeConfig", "PromptFreeSegmenter", "PromptSAM", "hungarian_match",
           "load_prompt_free", "match_cost", "save_prompt_free", "set_loss"]
