"""Generator LoRA adapters on disk: save, load (verified), model card.

A run folder holds the adapter in the two layouts the ecosystem loads, both with PEFT's key names for
every layer (attention, conv, proj, feed-forward, time embedding alike):

  * ``pytorch_lora_weights.safetensors``: keys ``unet.<module>.lora_A.weight`` / ``lora_B.weight`` and
    the ``LoraConfig`` (rank, alpha, targets) in the safetensors header (``lora_adapter_metadata``), for
    ``StableDiffusionInpaintPipeline.load_lora_weights(folder)``;
  * ``adapter_config.json`` + ``adapter_model.safetensors``: PEFT's own layout, for
    ``PeftModel.from_pretrained(unet, folder)``.

Older files mixed diffusers' legacy names (``to_q.lora.down``) for attention layers with PEFT names for
the rest; diffusers decides the format from the first key and silently drops the layers in the other
one. ``read_lora`` converts such files key by key, and every loader here checks that each tensor of the
file reached the model (``verify_loaded``), so a partial load raises instead of sampling another model.
"""

from __future__ import annotations

import copy
import json
import logging
import re
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

REF_ADAPTER = "reference"  # PEFT adapter names on the generator's UNet: the frozen reference LoRA ...
POLICY_ADAPTER = "default"  # ... and the trained policy LoRA (PEFT's default name)

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' load_lora_weights default name
PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHT_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PeftModel's key prefix in adapter_model.safetensors
UNET_PREFIX = "unet."
_LEGACY_MARKERS = (".lora.down.", ".lora.up.", "_lora.down.", "_lora.up.")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def is_hub_id_or_path(name: str | None) -> bool:
    """True for ``org/name`` Hub ids and existing local paths (what ``from_pretrained`` accepts); not presets."""
    if not name:
        return False
    return Path(name).exists() or (_HUB_ID.fullmatch(name) is not None and ".." not in name)


def lora_state_dict(unet: torch.nn.Module, adapter_name: str = POLICY_ADAPTER) -> dict[str, torch.Tensor]:
    """The adapter's LoRA tensors with PEFT key names (``<module>.lora_A.weight``), fp32 on the CPU."""
    from peft.utils import get_peft_model_state_dict

    sd = get_peft_model_state_dict(unet, adapter_name=adapter_name)
    return {k: v.detach().float().cpu().contiguous() for k, v in sd.items()}


def save_lora(unet: torch.nn.Module, out_dir: Path, base_model: str | None = None,
              adapter_name: str = POLICY_ADAPTER) -> None:
    """Write the adapter for diffusers (``pytorch_lora_weights.safetensors``) and PEFT (``adapter_*``).

    ``base_model`` (a Hub id or a path) is recorded as PEFT's ``base_model_name_or_path``; presets such
    as ``tiny`` are left out since ``from_pretrained`` cannot resolve them.
    """
    from diffusers import StableDiffusionInpaintPipeline
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sd = lora_state_dict(unet, adapter_name)
    config = copy.deepcopy(unet.peft_config[adapter_name])
    config.base_model_name_or_path = base_model if is_hub_id_or_path(base_model) else None
    for key, value in vars(config).items():  # sets (target_modules) are written in hash-seed order otherwise
        if isinstance(value, (set, frozenset)):
            setattr(config, key, sorted(value, key=str))
    StableDiffusionInpaintPipeline.save_lora_weights(
        str(out_dir), unet_lora_layers=sd, unet_lora_adapter_metadata=config.to_dict(), safe_serialization=True)
    config.save_pretrained(str(out_dir))
    save_file({PEFT_PREFIX + k: v for k, v in sd.items()}, str(out_dir / PEFT_WEIGHT_NAME), metadata={"format": "pt"})


def lora_content_sha(path: str | Path) -> str:
    """sha256 of what a LoRA safetensors file holds, not of its bytes: every tensor (name, dtype, shape, data, in
    name order) and the ``lora_adapter_metadata`` as canonical JSON (keys sorted, lists of names sorted).
    safetensors writes its header's metadata in hash order, so identical adapters can differ byte-wise."""
    import hashlib

    from safetensors import safe_open

    h = hashlib.sha256()
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata() or {}
        for name in sorted(f.keys()):
            t = f.get_tensor(name).contiguous()
            h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    meta = header.get("lora_adapter_metadata")
    if meta:
        try:
            h.update(json.dumps(_canonical(json.loads(meta)), sort_keys=True).encode())
        except ValueError:
            h.update(meta.encode())
    return h.hexdigest()


def _canonical(value):
    """JSON value with every list of strings sorted (PEFT's set-valued fields) and dicts recursed."""
    if isinstance(value, dict):
        return {k: _canonical(v) for k, v in value.items()}
    if isinstance(value, list):
        items = [_canonical(v) for v in value]
        return sorted(items) if all(isinstance(v, str) for v in items) else items
    return value


def _is_legacy(keys) -> bool:
    return any(marker in k for k in keys for marker in _LEGACY_MARKERS)


def read_lora(folder: str | Path) -> tuple[dict[str, torch.Tensor], dict | None, bool]:
    """(tensors with PEFT names and no ``unet.`` prefix, the ``LoraConfig`` dict or None, legacy?) of a folder.

    Legacy mixed-format files are converted key by key, so no layer is lost.
    """
    from diffusers.utils import convert_unet_state_dict_to_peft
    from safetensors import safe_open

    path = Path(folder) / LORA_WEIGHT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no {LORA_WEIGHT_NAME}")
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata() or {}
        sd = {k: f.get_tensor(k) for k in f.keys()}
    other = [k for k in sd if not k.startswith(UNET_PREFIX)]
    if other:
        raise ValueError(f"{path}: tensors outside the UNet (e.g. {other[0]}); expected a negdpo generator adapter")
    sd = {k[len(UNET_PREFIX):]: v for k, v in sd.items()}
    legacy = _is_legacy(sd)
    if legacy:
        sd = convert_unet_state_dict_to_peft(sd)  # per key, whatever the first key's format
    meta = json.loads(header["lora_adapter_metadata"]) if header.get("lora_adapter_metadata") else None
    if meta is not None:
        meta = {k[len(UNET_PREFIX):]: v for k, v in meta.items() if k.startswith(UNET_PREFIX)} or meta
    return sd, meta, legacy


def verify_loaded(unet: torch.nn.Module, expected: dict[str, torch.Tensor], adapter_name: str, where: str) -> None:
    """Raise unless the UNet's adapter holds exactly ``expected`` (same keys, equal values)."""
    from peft.utils import get_peft_model_state_dict

    got = {k: v.detach().cpu() for k, v in get_peft_model_state_dict(unet, adapter_name=adapter_name).items()
           if not v.is_meta}  # diffusers leaves layers the file lacks on the meta device
    missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    if missing or extra:
        raise RuntimeError(f"{where}: LoRA load incomplete: {len(got) - len(extra)} of {len(expected)} tensors "
                           f"injected (missing e.g. {missing[:2]}, unexpected e.g. {extra[:2]})")
    unequal = [k for k, v in expected.items() if not torch.equal(got[k], v.to(got[k].dtype))]
    if unequal:
        raise RuntimeError(f"{where}: {len(unequal)} LoRA tensors differ after loading, e.g. {unequal[:2]}")


def load_adapter(pipe, folder: str | Path, adapter_name: str) -> None:
    """Load a run folder's LoRA into ``pipe.unet`` through ``load_lora_weights`` (as users do) and verify it."""
    sd, meta, legacy = read_lora(folder)
    if legacy:
        logger.warning("%s: legacy mixed-format LoRA keys converted while loading; re-save to update the file", folder)
        pipe.load_lora_into_unet({UNET_PREFIX + k: v for k, v in sd.items()}, network_alphas=None, unet=pipe.unet,
                                 adapter_name=adapter_name, _pipeline=pipe,
                                 metadata={UNET_PREFIX + k: v for k, v in meta.items()} if meta else None)
    else:
        pipe.load_lora_weights(str(folder), weight_name=LORA_WEIGHT_NAME, adapter_name=adapter_name)
    verify_loaded(pipe.unet, {k: v.float() for k, v in sd.items()}, adapter_name, str(folder))


def load_lora_into(unet: torch.nn.Module, in_dir: Path, adapter_name: str = POLICY_ADAPTER) -> None:
    """Resume: copy a saved adapter into the UNet's existing adapter of the same targets and rank."""
    from peft.utils import set_peft_model_state_dict

    sd, _, _ = read_lora(in_dir)
    result = set_peft_model_state_dict(unet, sd, adapter_name=adapter_name)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise RuntimeError(f"{in_dir}: unexpected LoRA keys when resuming, e.g. {unexpected[:3]}")
    verify_loaded(unet, {k: v.float() for k, v in sd.items()}, adapter_name, str(in_dir))


def _field(cfg, *names: str, default=None):
    for name in names:
        if hasattr(cfg, name):
            return getattr(cfg, name)
    return default


def _text(value) -> str:
    """User text for inline markdown code: one line, no backticks."""
    return str(value).replace("`", "'").replace("\n", " ").replace("\r", " ")


def model_card(cfg, metrics: dict, adapter_dir: str | Path | None = None) -> str:
    """README.md for a run folder: YAML front matter, what was trained, and a loading snippet that runs.

    ``adapter_dir`` is the folder the card is written to (default ``cfg.output_dir``, else ``"."``).
    """
    model = str(_field(cfg, "pretrained_model_name_or_path", "pretrained_model", default="tiny"))
    data = _field(cfg, "dataset_name", "data", default="")
    rank = _field(cfg, "rank", "lora_rank", default="?")
    method = str(_field(cfg, "train_method", default="dpo"))
    ref = _field(cfg, "reference_adapter")
    folder = str(adapter_dir or _field(cfg, "output_dir") or ".")
    front = ["library_name: diffusers"]
    if is_hub_id_or_path(model):
        front.append(f"base_model: {json.dumps(model)}")
    front.append("tags: [lora, peft, stable-diffusion, inpainting, diffusion-dpo, negdpo]")
    base_expr = repr(model) if is_hub_id_or_path(model) else f"resolve_diffusion({model!r})"  # presets: negdpo
    imp = "" if is_hub_id_or_path(model) else "from negdpo.core.models import resolve_diffusion  # negdpo presets\n"
    fuse_ref = "" if not ref else (
        f"plain.load_lora_weights({str(ref)!r}, adapter_name=\"reference\")  # trained on top of this adapter\n"
        "plain.fuse_lora(components=[\"unet\"], adapter_names=[\"reference\"])\n"
        "plain.unload_lora_weights()\n")
    peft_note = "" if not ref else "; that gives base + this adapter only, so fuse the reference adapter first"
    what = "Diffusion-DPO" if method == "dpo" else "SFT (inpainting denoising loss)"
    return f"""---
{chr(10).join(front)}
---
# negdpo generator LoRA ({_text(method)}) — {_text(_field(cfg, "run_name", default=""))}

LoRA (rank {_text(rank)}, targets `{_text(_field(cfg, "lora_targets", default=""))}`) on `{_text(model)}` trained with
{what} for {_text(_field(cfg, "max_train_steps", default="?"))} steps on `{_text(data)}` to remove lesions inside a mask
while keeping the anatomy outside it. Reference adapter: `{_text(ref or "none (base weights)")}`.
beta = {_text(_field(cfg, "beta", default="?"))} (convention with the 1/2), loss `{_text(_field(cfg, "loss_type", default="?"))}`, \
SDPO {_text(_field(cfg, "sdpo", default="?"))} (mu {_text(_field(cfg, "sdpo_mu", default="?"))}), \
masked-MI weight {_text(_field(cfg, "mi_weight", default="?"))}, fidelity weight {_text(_field(cfg, "fidelity_weight", default="?"))}.

Files: `{LORA_WEIGHT_NAME}` (diffusers `load_lora_weights`), `{PEFT_CONFIG_NAME}` + `{PEFT_WEIGHT_NAME}`
(PEFT: `PeftModel.from_pretrained(pipe.unet, folder)`{peft_note}), `negdpo_adapter.json` (reference adapter chain).

```python
from diffusers import StableDiffusionInpaintPipeline
from negdpo.generator.sample import load_generator
{imp}
adapter = {folder!r}  # this folder
# negdpo: base + reference adapter chain (negdpo_adapter.json) + this adapter, each load checked tensor by tensor
pipe = load_generator({model!r}, adapter=adapter)

# or plain diffusers (load_lora_weights changes the pipeline in place and returns None)
plain = StableDiffusionInpaintPipeline.from_pretrained({base_expr}, safety_checker=None, requires_safety_checker=False)
{fuse_ref}plain.load_lora_weights(adapter)
```

Held-out implicit accuracy: `{_text(json.dumps(metrics))}`

Research artefact for generating synthetic tumour-free counterparts; not for clinical use.
"""
