"""Generator LoRA adapters on disk: save, load into a UNet, model card.

The run folder holds ``pytorch_lora_weights.safetensors`` for ``StableDiffusionInpaintPipeline.load_lora_weights``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .pipeline import POLICY_ADAPTER


def lora_state_dict(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    sd = get_peft_model_state_dict(unet, adapter_name=POLICY_ADAPTER)
    return convert_state_dict_to_diffusers({k: v.detach().float().cpu().contiguous() for k, v in sd.items()})


def save_lora(unet: torch.nn.Module, out_dir: Path) -> None:
    from diffusers import StableDiffusionInpaintPipeline

    StableDiffusionInpaintPipeline.save_lora_weights(
        str(out_dir), unet_lora_layers=lora_state_dict(unet),
        unet_lora_adapter_metadata=unet.peft_config[POLICY_ADAPTER].to_dict(), safe_serialization=True)


def load_lora_into(unet: torch.nn.Module, in_dir: Path) -> None:
    from diffusers import StableDiffusionInpaintPipeline
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict

    sd, _ = StableDiffusionInpaintPipeline.lora_state_dict(str(in_dir))
    sd = convert_unet_state_dict_to_peft({k[len("unet."):]: v for k, v in sd.items() if k.startswith("unet.")})
    result = set_peft_model_state_dict(unet, sd, adapter_name=POLICY_ADAPTER)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise RuntimeError(f"{in_dir}: unexpected LoRA keys when resuming, e.g. {unexpected[:3]}")


def model_card(cfg, metrics: dict) -> str:
    ref = cfg.reference_adapter or "none (base weights)"
    return f"""---
library_name: diffusers
base_model: {cfg.pretrained_model_name_or_path}
tags: [lora, stable-diffusion, inpainting, diffusion-dpo, negdpo]
---
# negdpo generator LoRA ({cfg.train_method}) — {cfg.run_name}

LoRA (rank {cfg.rank}, targets `{cfg.lora_targets}`) on `{cfg.pretrained_model_name_or_path}` trained with
{'Diffusion-DPO' if cfg.train_method == 'dpo' else 'SFT (inpainting denoising loss)'} for {cfg.max_train_steps} steps
on `{cfg.dataset_name}` to remove lesions inside a mask while keeping the anatomy outside it.
Reference adapter: {ref}. beta = {cfg.beta:g} (convention with the 1/2), loss `{cfg.loss_type}`,
SDPO {cfg.sdpo} (mu {cfg.sdpo_mu}), masked-MI weight {cfg.mi_weight}, fidelity weight {cfg.fidelity_weight}.

```python
from negdpo.generator.sample import load_generator, inpaint
pipe = load_generator("{cfg.pretrained_model_name_or_path}", adapter="<this folder>")
# or: StableDiffusionInpaintPipeline.from_pretrained(...).load_lora_weights("<this folder>")
```

Held-out implicit accuracy: {json.dumps(metrics)}

Research artefact for generating synthetic tumour-free counterparts; not for clinical use.
"""
