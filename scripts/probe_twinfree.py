"""Indicative probe (not a study claim): does the twin-free generator learn anything on a small phantom set?

    python scripts/probe_twinfree.py --work /tmp/probe [--n 40 --sft_steps 300 --dpo_steps 60 --rounds 2]

Everything trained here is twin-free (autoencoder ``twins=False``, SFT ``sft_source=healthy``, on-policy rounds);
the twins are read only at the end, to score the held-out (val + test) positives: mean |output - twin| inside
the lesion mask, per modality, for no repair, the harmonic fill, its VAE round trip, the adapted but untrained
model, the twin-free SFT and each on-policy round (sampled from the harmonic fill at strength 0.5, paste-back).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", required=True)
    p.add_argument("--n", type=int, default=40)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--ae_steps", type=int, default=150)
    p.add_argument("--sft_steps", type=int, default=300)
    p.add_argument("--dpo_steps", type=int, default=60)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--candidates", type=int, default=4)
    p.add_argument("--train_positives", type=int, default=24)
    p.add_argument("--rejected", default="worst", choices=["worst", "source"])
    p.add_argument("--mi_weight", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    import torch
    from negdpo.core.console import setup_logging
    from negdpo.core.fill import classical_fill
    from negdpo.core.phantoms import PhantomConfig, generate
    from negdpo.core.scans import ScanFolder
    from negdpo.generator.autoencoder import adapt_autoencoder
    from negdpo.generator.config import GenTrainConfig
    from negdpo.generator.evaluate import inside_error
    from negdpo.generator.sample import inpaint, load_generator, paste_back_blend

    from negdpo.onpolicy import repaint_mask, run_onpolicy, train_sft_healthy

    setup_logging()
    torch.set_num_threads(1)
    work = Path(args.work)
    data = work / "phantoms"
    if not (data / "meta.csv").is_file():
        generate(PhantomConfig(out=str(data), n=args.n, size=args.size, seed=args.seed, slices=2))
    model = str(work / "ae")
    if not (work / "ae" / "model_index.json").is_file():
        adapt_autoencoder("tiny", str(data), model, steps=args.ae_steps, batch_size=8, seed=args.seed, twins=False)
    common = dict(pretrained_model_name_or_path=model, dataset_name=str(data), train_batch_size=8, learning_rate=3e-3,
                  report_to="none", eval_pairs=0, validation_steps=0, checkpointing_steps=0, cache_latents=True,
                  seed=args.seed, rank=16, resume_from_checkpoint="latest", torch_threads=1)
    sft = str(work / "sft")
    if not (work / "sft" / "summary.json").is_file():
        sft = train_sft_healthy(GenTrainConfig(**common, output_dir=sft, max_train_steps=args.sft_steps))
    rounds = run_onpolicy(GenTrainConfig(**(common | dict(
        output_dir=str(work / f"onpolicy_{args.rejected}_mi{args.mi_weight:g}"), train_method="onpolicy",
        reference_adapter=sft, rounds=args.rounds, candidates=args.candidates, max_train_steps=args.dpo_steps,
        max_train_pairs=args.train_positives, onpolicy_rejected=args.rejected, mi_weight=args.mi_weight,
        sample_steps=10, learning_rate=1e-3, train_batch_size=4))))

    held = [s for split in ("val", "test") for s in ScanFolder(data).load_split(split) if s.positive]
    masks = [repaint_mask(s.mask, 2) for s in held]
    outputs: dict[str, list[np.ndarray]] = {
        "no_repair": [s.image for s in held],
        "harmonic": [classical_fill(s.image, s.mask, dilate=2) for s in held]}
    vae = load_generator(model).vae
    with torch.no_grad():
        rt = []
        for fill, m in zip(outputs["harmonic"], masks):
            x = torch.from_numpy(np.repeat(fill[None, None], 3, 1) * 2 - 1).float()
            y = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)[0].mean(0).numpy() / 2 + 0.5
            rt.append(paste_back_blend(fill, y, m))
    outputs["harmonic_vae"] = rt
    seeds = list(range(len(held)))
    for name, adapter in [("untrained", None), ("sft_healthy", sft)] + [(f"onpolicy_r{i}", a)
                                                                        for i, a in enumerate(rounds, 1)]:
        pipe = load_generator(model, adapter)
        outputs[name] = inpaint(pipe, [s.image for s in held], masks, [s.prompt or "" for s in held], seeds,
                                steps=20, strength=0.5, init="harmonic")
    table = {}
    for name, outs in outputs.items():
        errs = {"all": [], "mri": [], "us": []}
        for s, o in zip(held, outs):
            e = inside_error(o, s.twin, s.mask)
            errs["all"].append(e)
            errs[s.name.split("_", 1)[0]].append(e)
        table[name] = {k: round(float(np.mean(v)), 4) for k, v in errs.items() if v}
    table["n_held_out"] = len(held)
    (work / f"probe_{args.rejected}_mi{args.mi_weight:g}.json").write_text(json.dumps(table, indent=1))
    print(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
