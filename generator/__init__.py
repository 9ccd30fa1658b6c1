"""Negative generator: SD inpainting + LoRA trained with Diffusion-DPO and the masked-MI regulariser."""
