"""Config parsing (YAML + overrides through HfArgumentParser), seeds, accelerate configs."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest
from negdpo.core.config import derive_seed, parse_config, save_config, tracker_config

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Demo:
    data_dir: str = field(metadata={"help": "scan folder"})
    learning_rate: float = 1e-4
    steps: int = 10
    targets: list[str] = field(default_factory=lambda: ["to_q", "to_k"])
    use_mi: bool = False


def test_yaml_then_flag_overrides(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("data_dir: /d\nlearning_rate: 0.5\ntargets: [to_v]\nuse_mi: true\n")
    cfg = parse_config(Demo, ["--config", str(cfg_file), "--steps", "3", "--learning_rate", "2e-3"])
    assert cfg == Demo(data_dir="/d", learning_rate=2e-3, steps=3, targets=["to_v"], use_mi=True)
    assert parse_config(Demo, ["--data_dir", "x"]).steps == 10  # no YAML: dataclass defaults


def test_unknown_yaml_key_and_unknown_flag_are_errors(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("data_dir: /d\nlearnin_rate: 0.5\n")
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['learnin_rate'\]"):
        parse_config(Demo, ["--config", str(cfg_file)])
    with pytest.raises(SystemExit):
        parse_config(Demo, ["--data_dir", "x", "--nope", "1"])


def test_save_and_tracker_config(tmp_path):
    cfg = Demo(data_dir="/d")
    path = save_config(cfg, tmp_path)
    assert "learning_rate: 0.0001" in path.read_text() and "code_version" in path.read_text()
    flat = tracker_config(cfg)
    assert flat["targets"] == '["to_q", "to_k"]' and all(isinstance(v, (int, float, str, bool)) for v in flat.values())


def test_derive_seed_stable_and_distinct():
    # pinned: seeds must not change between versions, processes or machines (datasets depend on them)
    assert derive_seed("pair-1") == 650968468 and derive_seed("pair-1", base=1) == 372201837
    assert derive_seed("pair-1") != derive_seed("pair-2")
    assert derive_seed("pair-1", base=1) != derive_seed("pair-1")
    assert 0 <= derive_seed("x") < 2**31


@pytest.mark.parametrize("name", ["cpu", "single_gpu", "multi_gpu", "fsdp", "deepspeed_zero2"])
def test_accelerate_configs_parse(name):
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(ROOT / "accelerate_configs" / f"{name}.yaml"))
    expected = {"cpu": "NO", "single_gpu": "NO", "multi_gpu": "MULTI_GPU", "fsdp": "FSDP",
                "deepspeed_zero2": "DEEPSPEED"}[name]
    assert str(cfg.distributed_type).split(".")[-1] == expected
    if name == "fsdp":
        assert cfg.fsdp_config["fsdp_use_orig_params"] is True
    if name == "deepspeed_zero2":
        assert cfg.deepspeed_config["zero_stage"] == 2


def test_resolve_device():
    import torch
    from negdpo.core.config import resolve_device

    assert resolve_device("cpu") == "cpu" and resolve_device("cuda:1") == "cuda:1"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
