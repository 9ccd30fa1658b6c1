"""Artefacts load everywhere: generator LoRA adapters through diffusers, PEFT and negdpo's own loaders
(every LoRA tensor and the UNet output equal to the trained model's), model cards whose snippet runs, and
CLIP checkpoints that still load after being moved."""

from __future__ import annotations

import json
import re
import shutil
from importlib.resources import files
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from json_common import json_strings
from negdpo.generator.lora_io import (
    LORA_WEIGHT_NAME,
    PEFT_CONFIG_NAME,
    PEFT_WEIGHT_NAME,
    load_lora_into,
    model_card,
    save_lora,
)
from negdpo.generator.pipeline import POLICY_ADAPTER, add_lora


def _config_targets(name: str) -> str:
    return yaml.safe_load(files("negdpo.configs").joinpath(name).read_text())["lora_targets"]


TARGETS = {
    "attention": "to_q,to_k,to_v,to_out.0",  # the GenTrainConfig default
    "demo": _config_targets("demo.yaml"),  # + conv1/conv2/proj_in/proj_out
    "all_layers": _config_targets("gen_sft_phantoms.yaml"),  # every conv/linear layer incl. conv_in/out, time emb
}


def _pipe(path: str):
    from negdpo.core.models import load_inpaint_pipeline

    pipe = load_inpaint_pipeline(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _unet(path: str):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(path, subfolder="unet")


def _trained_unet(path: str, targets: str, seed: int = 0):
    """A UNet with a policy LoRA whose A and B are both random (B = 0 would make every adapter a no-op);
    alpha != rank, so a loader that ignores the saved config would scale it wrongly."""
    unet = _unet(path)
    add_lora(unet, rank=4, alpha=2.0, targets=targets.split(","))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return unet


def _peft_weights(unet, adapter_name: str) -> dict[str, torch.Tensor]:
    from peft.utils import get_peft_model_state_dict

    sd = get_peft_model_state_dict(unet, adapter_name=adapter_name)
    return {k.removeprefix("base_model.model."): v.float() for k, v in sd.items()}


def _unet_out(unet) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, unet.config.in_channels, 16, 16, generator=g)
    ctx = torch.randn(1, 77, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        return unet(x, 10, ctx).sample


def _assert_same_adapter(trained: dict, loaded: dict) -> None:
    assert sorted(loaded) == sorted(trained)
    assert all(torch.equal(loaded[k], trained[k]) for k in trained)


@pytest.mark.parametrize("kind", list(TARGETS))
def test_adapter_loads_losslessly_with_diffusers_peft_and_negdpo(tiny_sd_path, tmp_path, kind):
    from negdpo.generator.sample import load_generator
    from peft import PeftModel

    unet = _trained_unet(tiny_sd_path, TARGETS[kind])
    trained, want = _peft_weights(unet, POLICY_ADAPTER), _unet_out(unet)
    n_modules = len({k.split(".lora_")[0] for k in trained})
    assert len(trained) == 2 * n_modules and n_modules >= 8
    save_lora(unet, tmp_path, base_model=tiny_sd_path)
    for name in (LORA_WEIGHT_NAME, PEFT_CONFIG_NAME, PEFT_WEIGHT_NAME):
        assert (tmp_path / name).is_file(), name
    base_out = _unet_out(_unet(tiny_sd_path))
    assert (want - base_out).abs().max() > 1e-3  # the adapter changes the output, so equality below means something

    pipe = _pipe(tiny_sd_path)  # plain diffusers, default weight name
    pipe.load_lora_weights(str(tmp_path), adapter_name="x")
    _assert_same_adapter(trained, _peft_weights(pipe.unet, "x"))
    assert pipe.unet.peft_config["x"].lora_alpha == 2.0
    torch.testing.assert_close(_unet_out(pipe.unet), want, atol=1e-5, rtol=0)

    peft_unet = PeftModel.from_pretrained(_unet(tiny_sd_path), str(tmp_path))
    assert peft_unet.peft_config["default"].base_model_name_or_path == tiny_sd_path
    _assert_same_adapter(trained, _peft_weights(peft_unet, "default"))
    torch.testing.assert_close(_unet_out(peft_unet), want, atol=1e-5, rtol=0)

    ours = load_generator(tiny_sd_path, str(tmp_path)).unet
    _assert_same_adapter(trained, _peft_weights(ours, "negdpo_0"))
    torch.testing.assert_close(_unet_out(ours), want, atol=1e-5, rtol=0)

    resumed = _unet(tiny_sd_path)  # training resume (accelerate load hook)
    add_lora(resumed, rank=4, alpha=2.0, targets=TARGETS[kind].split(","))
    load_lora_into(resumed, tmp_path)
    _assert_same_adapter(trained, _peft_weights(resumed, POLICY_ADAPTER))


def _write_legacy(unet, folder: Path) -> None:
    """The pre-fix file: attention keys in diffusers' legacy names, all other layers in PEFT names."""
    from diffusers import StableDiffusionInpaintPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    sd = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet, adapter_name=POLICY_ADAPTER))
    StableDiffusionInpaintPipeline.save_lora_weights(
        str(folder), unet_lora_layers=sd, unet_lora_adapter_metadata=unet.peft_config[POLICY_ADAPTER].to_dict())


def test_legacy_mixed_file_loads_completely_through_negdpo(tiny_sd_path, tmp_path):
    from negdpo.generator.sample import load_generator

    unet = _trained_unet(tiny_sd_path, TARGETS["demo"])
    trained, want = _peft_weights(unet, POLICY_ADAPTER), _unet_out(unet)
    _write_legacy(unet, tmp_path)
    plain = _pipe(tiny_sd_path)
    plain.load_lora_weights(str(tmp_path), adapter_name="x")
    got = _peft_weights(plain.unet, "x")
    lost = [k for k in trained if k not in got or not torch.equal(got[k], trained[k])]
    assert lost and all(re.search(r"\.to_(q|k|v|out\.0)\.", k) for k in lost)  # the bug this format avoids
    ours = load_generator(tiny_sd_path, str(tmp_path)).unet
    _assert_same_adapter(trained, _peft_weights(ours, "negdpo_0"))
    torch.testing.assert_close(_unet_out(ours), want, atol=1e-5, rtol=0)


def test_partial_load_raises(tiny_sd_path, tmp_path):
    from negdpo.generator.sample import load_generator
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    unet = _trained_unet(tiny_sd_path, TARGETS["attention"])
    save_lora(unet, tmp_path)
    load_generator(tiny_sd_path, str(tmp_path), dtype=torch.bfloat16)  # LoRA cast to bf16 still verifies equal
    path = tmp_path / LORA_WEIGHT_NAME
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata()
    sd = load_file(str(path))
    key = next(k for k in sd if k.endswith("lora_A.weight"))
    sd[key.replace(".lora_A.", "_x.lora_A.")] = sd.pop(key)  # a tensor no module of the UNet takes
    save_file(sd, str(path), metadata=header)
    with pytest.raises(RuntimeError, match="LoRA load incomplete"):
        load_generator(tiny_sd_path, str(tmp_path))
    other = _unet(tiny_sd_path)  # resume into an adapter with other targets
    add_lora(other, rank=4, targets=TARGETS["demo"].split(","))
    save_lora(unet, tmp_path)
    with pytest.raises(RuntimeError, match="incomplete"):
        load_lora_into(other, tmp_path)


def _card_cfg(model: str, out: Path, **kw) -> SimpleNamespace:
    base = dict(pretrained_model_name_or_path=model, dataset_name="data/`x`", run_name="r`un\nx", train_method="dpo",
                rank=4, lora_targets="to_q,to_k", max_train_steps=3, beta=5000.0, loss_type="sigmoid",
                reference_adapter=None, output_dir=str(out))
    return SimpleNamespace(**(base | kw))


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def _run_snippet(card: str) -> dict:
    scope: dict = {}
    exec(compile(re.search(r"```python\n(.*?)```", card, re.S).group(1), "README.md", "exec"), scope)  # noqa: S102
    return scope


def test_model_card_front_matter_and_snippet_runs(tiny_sd_path, tmp_path):
    unet = _trained_unet(tiny_sd_path, TARGETS["attention"])
    want = _unet_out(unet)
    sft, dpo = tmp_path / "sft", tmp_path / "dpo"
    save_lora(unet, sft)
    save_lora(unet, dpo)
    assert "base_model" not in _front_matter(model_card(_card_cfg("tiny", dpo), {}))
    assert _front_matter(model_card(_card_cfg("org/model-1.5", dpo), {}))["base_model"] == "org/model-1.5"

    card = model_card(_card_cfg("tiny", dpo), {"acc": "`"})  # preset base, adapter folder from cfg.output_dir
    title = card.split("---\n", 2)[2].lstrip().splitlines()[0]
    assert title.startswith("# ") and "`" not in title and title.endswith("r'un x")
    scope = _run_snippet(card)
    for name in ("pipe", "plain"):  # negdpo's loader and plain diffusers give the trained model
        torch.testing.assert_close(_unet_out(scope[name].unet), want, atol=1e-5, rtol=0)

    # DPO adapter trained on top of an SFT reference adapter: both recipes fuse the reference first
    (dpo / "negdpo_adapter.json").write_text(json.dumps({"reference_adapter": "../sft"}))  # relative to dpo/
    card = model_card(_card_cfg(tiny_sd_path, tmp_path / "elsewhere", reference_adapter=str(sft)), {}, adapter_dir=dpo)
    assert _front_matter(card)["base_model"] == tiny_sd_path
    scope = _run_snippet(card)
    stacked = _unet_out(scope["pipe"].unet)
    torch.testing.assert_close(_unet_out(scope["plain"].unet), stacked, atol=1e-5, rtol=0)
    assert (stacked - want).abs().max() > 1e-3  # the reference really was applied under the adapter


def _outputs(model, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        return (model.eval().encode_image(torch.randn(2, 3, 224, 224, generator=gen)),
                model.encode_text(tokenizer(["a lesion", "healthy tissue"])))


def test_clip_checkpoint_loads_after_move(tiny_clip, tmp_path, monkeypatch):
    """A tower built locally (the tiny preset) is saved into the folder and named ``"."``: no absolute
    path; plain open_clip loads the moved folder from inside it, negdpo's loader from anywhere."""
    import copy

    import open_clip
    from negdpo.core.models import load_clip
    from negdpo.preference.clip.model import apply_lora, save_clip_checkpoint

    model, _, tokenizer = tiny_clip
    policy = apply_lora(copy.deepcopy(model), "both", rank=2)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    merged_model = copy.deepcopy(policy).merge_and_unload()
    merged = merged_model.state_dict()
    first = save_clip_checkpoint(policy, "tiny", tmp_path / "run" / "final")
    cfg = json.loads((first / "open_clip_config.json").read_text())
    text_cfg = cfg["model_cfg"]["text_cfg"]
    assert text_cfg["hf_model_name"] == text_cfg["hf_tokenizer_name"] == "."  # the BERT lives in the folder
    assert not [v for v in json_strings(cfg, keys=False) if v.startswith("/") or str(tmp_path) in v or "presets" in v]
    assert {"config.json", "tokenizer_config.json"} <= {p.name for p in first.iterdir()}
    moved = tmp_path / "copied" / "final"
    shutil.copytree(first, moved)
    shutil.rmtree(tmp_path / "run")

    monkeypatch.chdir(moved)  # plain open_clip, no negdpo code: relative to the folder it is in
    plain, _ = open_clip.create_model_from_pretrained("local-dir:.")
    plain_tok = open_clip.get_tokenizer("local-dir:.")
    assert all(torch.equal(v, merged[k]) for k, v in plain.state_dict().items())
    for a, b in zip(_outputs(plain, plain_tok), _outputs(merged_model, tokenizer), strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    monkeypatch.chdir(tmp_path)

    loaded, _, tok = load_clip(str(moved))
    assert sorted(loaded.state_dict()) == sorted(merged)
    assert all(torch.equal(v, merged[k]) for k, v in loaded.state_dict().items())
    texts = ["a lesion", "healthy tissue"]
    assert torch.equal(tok(texts), tokenizer(texts))
    assert isinstance(open_clip.get_tokenizer(f"local-dir:{moved}"), open_clip.tokenizer.HFTokenizer)
    again = save_clip_checkpoint(load_clip(f"local-dir:{moved}")[0], str(moved), tmp_path / "second")
    assert json.loads((again / "open_clip_config.json").read_text())["model_cfg"]["text_cfg"]["hf_model_name"] == "."
    reloaded = load_clip(f"local-dir:{again}")[0].state_dict()
    assert all(torch.equal(v, merged[k]) for k, v in reloaded.items())


def _hub_cache(root: Path, repo: str, files_from: Path, names: tuple[str, ...]) -> None:
    """A Hugging Face cache holding ``repo`` (what a download leaves behind), for offline tests."""
    commit = "0" * 40
    repo_dir = root / f"models--{repo.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    snap = repo_dir / "snapshots" / commit
    snap.mkdir(parents=True)
    for name in names:
        shutil.copy(files_from / name, snap / name)


def test_clip_checkpoint_from_a_hub_tower_loads_moved_in_plain_open_clip(tiny_clip, tmp_path, monkeypatch):
    """A tower from the Hub keeps its Hub id, so plain ``local-dir:`` loads the moved folder from anywhere
    (tower config from the Hub cache, tokenizer and weights from the folder)."""
    import copy

    import huggingface_hub.constants
    import open_clip
    from negdpo.core.models import load_clip, resolve_clip
    from negdpo.preference.clip.model import save_clip_checkpoint

    repo = "negdpo-test/tiny-bert"
    preset = Path(resolve_clip("tiny").removeprefix("local-dir:"))
    source = tmp_path / "source"  # a CLIP whose config names its BERT by Hub id, like BiomedCLIP's
    shutil.copytree(preset, source)
    cfg = json.loads((source / "open_clip_config.json").read_text())
    cfg["model_cfg"]["text_cfg"].update(hf_model_name=repo, hf_tokenizer_name=repo)
    (source / "open_clip_config.json").write_text(json.dumps(cfg))
    _hub_cache(tmp_path / "hub", repo, preset, ("config.json",))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))

    model, _, tokenizer = tiny_clip
    tuned = copy.deepcopy(model)
    with torch.no_grad():
        tuned.visual.head.proj.weight.mul_(1.5)
        tuned.text.proj[0].weight.add_(0.01)
    saved = save_clip_checkpoint(tuned, str(source), tmp_path / "run" / "final")
    saved_cfg = json.loads((saved / "open_clip_config.json").read_text())
    assert saved_cfg["model_cfg"]["text_cfg"]["hf_model_name"] == saved_cfg["model_cfg"]["text_cfg"][
        "hf_tokenizer_name"] == repo
    assert not [v for v in json_strings(saved_cfg, keys=False) if v.startswith("/") or str(tmp_path) in v]
    moved = tmp_path / "elsewhere" / "final"
    shutil.move(str(saved), moved)
    shutil.rmtree(source)
    monkeypatch.chdir(tmp_path)  # not the folder: the Hub id resolves from any working directory
    plain, _ = open_clip.create_model_from_pretrained(f"local-dir:{moved}")
    plain_tok = open_clip.get_tokenizer(f"local-dir:{moved}")
    for a, b in zip(_outputs(plain, plain_tok), _outputs(tuned, tokenizer), strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    ours, _, tok = load_clip(str(moved))
    for a, b in zip(_outputs(ours, tok), _outputs(tuned, tokenizer), strict=True):
        assert torch.allclose(a, b, atol=1e-6)
