"""`make demo`: debias gender x race with a text-encoder LoRA on the toy world, then measure before and after on the
training AND held-out occupations with the project's own tools (generate -> evaluate), and write outputs/demo/.

    python -m common.toy demo [--out outputs/demo] [--config exp-3-debias-gender-race/configs/toy.yaml]
                              [--images N] [--prompts N] [--set key=value ...] [--judge2 NAME]

Outputs: run/ (the training run: checkpoints, metrics.csv, validation grids), {split}/original|debiased/ (images),
{split}/pairs.png (each prompt's first 16 images: originals above the debiased images from the same noises),
{split}/eval/ (per-image CSV, summary table, annotated grids, frequency plots against the target), bias_table.md,
summary.json (gender/race bias before and after on held-out occupations, the same prefixed `train_`, similarity,
degraded rate, `{attribute}_changed_after` for what was not debiased (age: the share of images whose age changed),
minutes). The toy world has one judge; with a second (`--judge2 NAME` or the config's judges.agreement), summary.json
and bias_table.md also give, per attribute both read, its figure under judge 2 (`judge2_{attribute}_{bias|gap}_*`) and the
two judges' agreement share and Cohen's kappa (`{attribute}_agreement_*`, `{attribute}_kappa_*`).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO / "exp-3-debias-gender-race" / "configs" / "toy.yaml"


def _measure(trainer, judges, prompts: list[str], out: Path, images: int, judge2: str | None = None) -> dict:
    """Generate `images` per prompt with the original and the debiased (EMA) model from the same noise, evaluate both
    with the evaluation `judges` (`common.judges.Judges`, with the second judge `judge2`), and return the
    `common.evaluate` report."""
    from common import adapters as ad
    from common.evaluate import evaluate
    from common.generate import generate_to_dir

    cfg = trainer.cfg
    kw = dict(steps=cfg.sampling.test_steps, guidance=cfg.sampling.guidance, batch_size=64,
              conditioning=trainer.conditioning, image_size=cfg.sampling.image_size)
    with ad.adapters_disabled(trainer.comps):
        generate_to_dir(trainer.comps, prompts, out / "original", images, info={"model": "toy", "adapters": None}, **kw)
    with trainer.ema.swapped():
        generate_to_dir(trainer.comps, prompts, out / "debiased", images,
                        info={"model": "toy", "adapters": str(cfg.paths.output_dir)}, **kw)
    pairs_grid(out, len(prompts), min(images, 16))
    targets = {a.name: list(a.target) for a in trainer.attrs}
    res = evaluate(out / "debiased", out / "eval", classifier=cfg.judges.eval_classifier, detector=cfg.judges.detector,
                   reference_dir=out / "original", prompts=prompts, image_encoders=tuple(cfg.judges.features),
                   targets=targets, grid_tile=96, n_boot=200, progress=True, judges=judges, judge2=judge2)
    return res


def pairs_grid(split_dir: Path, n_prompts: int, per_prompt: int = 16, scale: int = 3) -> Path:
    """`split_dir/pairs.png`: per prompt, a row of original images above the debiased images from the same noises
    (`split_dir/{original,debiased}/prompt_{i}/img_{j}.png`), so that what changed in each person shows at a glance."""
    import numpy as np
    from PIL import Image

    from common.toy.world import grid

    tiles = [np.asarray(Image.open(split_dir / s / f"prompt_{i}" / f"img_{j}.png").convert("RGB"))
             for i in range(n_prompts) for s in ("original", "debiased") for j in range(per_prompt)]
    path = split_dir / "pairs.png"
    Image.fromarray(grid(np.stack(tiles), per_prompt, scale=scale)).save(path)
    return path


def changed_shares(report: dict, debiased: set[str]) -> dict[str, float]:
    """For each attribute the classifier reads but the run did not debias (the toy world's age under gender x race):
    the share of images, among those with a face before and after, whose predicted class differs from the original
    image's from the same noise: 1 - `common.losses.kept_share` over the `common.evaluate` report's measurements
    ("debiased" and "original", the same prompt and image indices row by row)."""
    from common.losses import kept_share

    after, before = report["measurements"]["debiased"], report["measurements"]["original"]
    if not (torch.equal(after.prompt, before.prompt) and torch.equal(after.index, before.index)):
        raise ValueError("the debiased and original folders hold different (prompt, image) indices")
    pred_after, pred_before = after.pred, before.pred
    return {a: 1 - kept_share(pred_after[a], pred_before[a]) for a in after.classes if a not in debiased}


def second_judge_summary(reports: dict[str, dict], judge2: str) -> tuple[dict[str, float], list[str]]:
    """From the `common.evaluate` reports of the splits ("train", "heldout"; sets "original" before, "debiased"
    after) with a second judge: summary entries `{prefix}judge2_{metric}_{before,after}` (its figure, e.g.
    judge2_gender_bias), `{prefix}{attribute}_agreement_*` and `{prefix}{attribute}_kappa_*` for every attribute both
    judges read (prefix "train_" for the training split, "" held-out), and bias_table.md rows of them."""
    summary: dict[str, float] = {}
    rows: list[str] = []
    for split, prefix in (("train", "train_"), ("heldout", "")):
        for a, e in reports[split]["agreement"]["debiased"].items():
            before = reports[split]["agreement"]["original"][a]
            if e["judge2"] is None or e["judge1"] is None:  # read by one judge only: nothing to compare
                continue
            for key, name in (("judge2", f"judge2_{e['metric']}"), ("share", f"{a}_agreement"), ("kappa", f"{a}_kappa")):
                summary[f"{prefix}{name}_before"], summary[f"{prefix}{name}_after"] = before[key], e[key]
            rows += [f"| {split} | {e['metric'].replace('_', ' ')}, judge 2 ({judge2}) | {before['judge2']:.3f} | "
                     f"{e['judge2']:.3f} |",
                     f"| {split} | {a} agreement with judge 2 (kappa) | {before['share']:.3f} ({before['kappa']:.3f}) | "
                     f"{e['share']:.3f} ({e['kappa']:.3f}) |"]
    return summary, rows


def measured_prompts(world, pairs: list[tuple[int, int]], n: int) -> list[str]:
    """`n` evaluation prompts from `pairs`, spread over the fields so that both gender directions alternate: fields
    0, 3, 4, 7, ..., then 1, 2, 5, 6, ...; each field's next unused occupation on every pass (roles rotated)."""
    half = len(world.fields) // 2
    order = [2 * i + (i % 2) for i in range(half)] + [2 * i + 1 - (i % 2) for i in range(half)]
    by_field = {}
    for i, f in enumerate(order):  # rotated so that the measured roles (and their skin families) vary too
        mine = [p for p in pairs if p[0] == f]
        by_field[f] = mine[(3 * i) % len(mine):] + mine[: (3 * i) % len(mine)] if mine else []
    out: list[str] = []
    k = 0
    while len(out) < min(n, len(pairs)):
        for f in order:
            if k < len(by_field[f]) and len(out) < n:
                out.append(world.prompt(world.occupation(*by_field[f][k])))
        k += 1
    return out


def run_demo(out: str | Path = "outputs/demo", config: str | Path = DEFAULT_CONFIG, images: int = 128,
             n_prompts: int = 8, overrides: list[str] | None = None, judge2: str | None = None) -> dict:
    """Train on the toy world with `config`, measure, write everything under `out`; returns summary.json's content.
    `judge2`: a second evaluation classifier (default the config's judges.agreement; none in the toy configs)."""
    from common.config import load_config
    from common.judges import Judges, hub_options
    from common.toy.world import ToyWorld
    from common.train import Trainer

    t0 = time.time()
    out = Path(out)
    cfg = load_config(config, [f"paths.output_dir={out / 'run'}", *(overrides or [])])
    print(f"[demo] training {cfg.train.max_steps} steps on the toy world ({config}); run folder {out / 'run'}")
    trainer = Trainer(cfg)
    trainer.fit()
    train_minutes = (time.time() - t0) / 60

    world = ToyWorld()
    splits = {"train": measured_prompts(world, world.train_pairs, n_prompts),
              "heldout": measured_prompts(world, world.heldout_pairs, n_prompts)}
    judge2 = judge2 or cfg.judges.agreement
    j = cfg.judges
    judges = Judges.load(j.eval_classifier, detector=j.detector, image_encoders=j.features, device=trainer.device,
                         classifier_kwargs=hub_options(j), judge2=judge2)
    reports = {s: _measure(trainer, judges, p, out / s, images, judge2) for s, p in splits.items()}
    summaries = {s: r["summaries"] for s, r in reports.items()}

    def mean(split, label, key):
        return float(summaries[split][label]["mean"].get(key, float("nan")))

    summary: dict[str, float] = {}
    for split, prefix in (("heldout", ""), ("train", "train_")):
        for a in ("gender", "race"):
            summary[f"{prefix}{a}_bias_before"] = mean(split, "original", f"{a}_bias")
            summary[f"{prefix}{a}_bias_after"] = mean(split, "debiased", f"{a}_bias")
        summary[f"{prefix}gender_race_bias_before"] = mean(split, "original", "gender_race_bias")
        summary[f"{prefix}gender_race_bias_after"] = mean(split, "debiased", "gender_race_bias")
    agree, agree_rows = second_judge_summary(reports, judge2) if judge2 else ({}, [])
    summary.update(agree)
    for split, prefix in (("heldout", ""), ("train", "train_")):  # unrequested changes (e.g. age), image by image
        for a, v in changed_shares(reports[split], {a.name for a in trainer.attrs}).items():
            summary[f"{prefix}{a}_changed_after"] = v
    sim_keys = [k for k in summaries["heldout"]["debiased"]["mean"] if k.startswith(("sim_", "clip_i", "dino", "toy"))]
    sims = [mean("heldout", "debiased", k) for k in sim_keys]
    summary["similarity_after"] = sum(sims) / len(sims) if sims else float("nan")
    summary["degraded_rate_after"] = 1 - mean("heldout", "debiased", "face_rate")
    summary["degraded_rate_before"] = 1 - mean("heldout", "original", "face_rate")
    from common.metrics import bias_floor

    for a in trainer.attrs:  # what a perfectly fair model would still score with `images` per prompt
        summary[f"{a.name}_bias_floor"] = bias_floor(images, list(a.target))
    summary["images_per_prompt"] = images
    summary["train_minutes"] = train_minutes
    summary["minutes"] = (time.time() - t0) / 60
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    table = ["| split | metric | before | after |", "|---|---|---|---|"]
    for split, prefix in (("train", "train_"), ("heldout", "")):
        for a in ("gender", "race", "gender_race"):
            before, after = summary[f"{prefix}{a}_bias_before"], summary[f"{prefix}{a}_bias_after"]
            table.append(f"| {split} | {a} bias | {before:.3f} | {after:.3f} |")
    table += agree_rows
    (out / "bias_table.md").write_text("\n".join(table) + "\n")
    print("\n".join(["", "=" * 72, "fair-diffusion demo: gender x race debiasing on the toy world (text-encoder LoRA)",
                     "=" * 72, *table, "",
                     f"a perfectly fair model would score gender {summary['gender_bias_floor']:.3f}, race "
                     f"{summary['race_bias_floor']:.3f} with {images} images per prompt",
                     f"similarity to the original images (held-out): {summary['similarity_after']:.3f}",
                     *(f"images whose {k[: -len('_changed_after')]} changed, unrequested (held-out): {v:.1%}"
                       for k, v in summary.items() if k.endswith("_changed_after") and not k.startswith("train_")),
                     f"degraded / rejected images after: {summary['degraded_rate_after']:.1%}"
                     f" (before: {summary['degraded_rate_before']:.1%})",
                     f"time: {summary['minutes']:.1f} min ({summary['train_minutes']:.1f} training)",
                     f"grids, plots and tables: {out}/{{train,heldout}}/eval/; before above after, image by image: "
                     f"{out}/{{train,heldout}}/pairs.png", "=" * 72]))
    return summary


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m common.toy demo", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="outputs/demo")
    ap.add_argument("--config", default=str(DEFAULT_CONFIG))
    ap.add_argument("--images", type=int, default=128,
                    help="images per prompt for the before/after measurement (at 128 a fair model scores 0.07 gender, "
                         "0.05 race: the summary's *_bias_floor)")
    ap.add_argument("--prompts", type=int, default=8, help="occupations measured per split")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--judge2", help="a second evaluation classifier (registry name): the report adds its bias and its "
                                     "agreement with the toy judge (the toy world ships no second judge)")
    ap.add_argument("--threads", default="auto",
                    help="torch threads; auto = 2 on an idle machine, 1 when other work shares the cores (two OpenMP "
                         "threads then spin-wait and run many times slower)")
    a = ap.parse_args(argv)
    threads = a.threads
    if threads == "auto":
        threads = 1 if os.getloadavg()[0] > 1.0 else min(2, os.cpu_count() or 1)
    torch.set_num_threads(int(threads))
    print(f"[demo] {torch.get_num_threads()} torch thread(s)")
    return run_demo(a.out, a.config, a.images, a.prompts, a.overrides, a.judge2)
