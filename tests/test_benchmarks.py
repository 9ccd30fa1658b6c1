"""benchmarks/run_all.py: the GPU command's code path, run at tiny size on CPU."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.integration
def test_run_all_tiny_cpu_writes_every_comparison(tmp_path):
    run_all = _load("run_all")
    out = tmp_path / "cpu_tiny.json"
    assert run_all.main(["--device", "cpu", "--threads", "1", "--out", str(out),
                         "--gen-variants", "baseline,channels_last,xformers"]) == 0
    rep = json.loads(out.read_text())
    res = rep["results"]
    assert set(res) == {"dpo_step", "m2ib", "clip_step", "generation", "zero_shot"}
    dpo = res["dpo_step"]
    assert dpo["lora_disable_adapters"]["ok"] and dpo["full_ft_second_unet"]["ok"]
    assert dpo["full_ft_second_unet"]["result"]["train"] == "full"
    assert dpo["lora_disable_adapters"]["result"]["reference"] == "disable_adapters"
    lora, full = (dpo[k]["result"]["s_per_step"] for k in ("lora_disable_adapters", "full_ft_second_unet"))
    assert dpo["speedup_pairs_per_s"] == round(full / lora, 3)  # the ratio is the two measured step times
    m2ib = res["m2ib"]["result"]
    assert res["m2ib"]["speedup_batched"] == round(m2ib["m2ib_batched_2"] / m2ib["m2ib_one_at_a_time"], 3)
    clip = res["clip_step"]["result"]
    assert {"dhn_nce", "dpo_cached_ref", "dpo_on_the_fly"} <= set(clip)
    gen = res["generation"]
    assert gen["baseline"]["vs_baseline"] == 1.0
    base = gen["baseline"]["result"]
    assert base["finite"] and base["unet_calls"] == base["steps"]  # CFG: one batched UNet call per step
    assert 0 < base["outside_unet_share"] < 1 and abs(base["unet_share"] + base["outside_unet_share"] - 1) < 1e-2
    assert "skipped" in gen["xformers"]["result"] and gen["xformers"]["vs_baseline"] is None  # no CUDA here
    assert res["zero_shot"]["result"]["whole_chain"] > 0
    assert rep["table"].count("\n") >= 7 and "| M2IB img/s" in rep["table"]
    assert rep["env"]["mode"] == "tiny" and not rep["env"]["real"]
