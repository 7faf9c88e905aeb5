"""Measure what limits debiasing on the toy world: train with a config (and overrides) on a chosen set of training
occupations, and every `--every` steps measure, on `--prompts` training and held-out occupations at `--images` images
each, every trained attribute's bias (or its gap to a non-uniform target), the valid-face rate and the similarity to
the original model's image from the same noise. Lighter than `make demo` (in memory, no files per image), so several
settings can be compared in one sitting.

    python -m research.toy_probe --out outputs/probe/w8 --steps 400 --every 100 --set loss.w_img=8
    python -m research.toy_probe --out outputs/probe/few --train-set per-word:1      # 16 training occupations
    python -m research.toy_probe --out outputs/probe/long --train-set direction:long  # fields of one gender direction

Writes OUT/probe.csv (step, weights, split, one column per trained attribute: {attribute}_bias for a uniform target,
{attribute}_gap (mean |frequency - target|) otherwise, as exp-4's age at 75/25; {attribute}_kept for each `loss.keep`
attribute: the share of images (with a face in both) whose class equals the original image's; valid_rate, similarity, minutes)
and prints each row. The training run itself (metrics.csv and the last step's checkpoint) is in OUT/run/, its training
prompts in OUT/train_prompts.txt (the config's `prompts.train`).
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import numpy as np
import torch

from common.toy.demo import DEFAULT_CONFIG, measured_prompts


def training_pairs(world, spec: str) -> list[tuple[int, int]]:
    """The (field, role) pairs to train on: `all` (every training occupation), `per-word:N` (the world's balanced
    subset, every field and role word N times) or `direction:long|short` (the fields whose majority has that hair)."""
    if spec == "all":
        return list(world.train_pairs)
    kind, _, arg = spec.partition(":")
    if kind == "per-word" and arg.isdigit() and int(arg) >= 1:
        return [world.parse(o) for o in world.train_subset(int(arg))]
    if kind == "direction" and arg in ("long", "short"):
        majority = 0 if arg == "long" else 1  # gender class 0 ("female") = long hair
        return [p for p in world.train_pairs if world.majority(*p)[0] == majority]
    raise ValueError(f"--train-set '{spec}': expected all, per-word:N (N >= 1) or direction:long|short")


class Probe:
    """Fixed noise per measured prompt; the original model is measured once and kept as the reference. Measures
    through the trainer's judges (`Judges.measure`), as validation and `common.evaluate` do."""

    def __init__(self, trainer, prompts: dict[str, list[str]], images: int):
        from common.generate import noise_for

        self.tr, self.prompts, self.images = trainer, prompts, images
        shape = trainer.comps.latent_shape(trainer.cfg.sampling.image_size)
        self.noise = {p: noise_for(p, range(images), shape) for ps in prompts.values() for p in ps}
        self.reference: dict[str, tuple] = {}

    @torch.no_grad()
    def _measure(self, prompts: list[str]):
        """(`Measurement`, {prompt index: images}) of the model as it is now."""
        from common.sampling import sample

        cfg, images = self.tr.cfg, {}

        def model(i, prompt, idx):
            n = self.noise[prompt][list(idx)]
            return sample(self.tr.comps, [prompt] * n.shape[0], n, cfg.sampling.test_steps,
                          guidance=cfg.sampling.guidance, conditioning=self.tr.conditioning).images

        m = self.tr.judges.measure(model, prompts, self.images, batch_size=self.images,
                                   on_batch=lambda i, idx, x, j, last: images.__setitem__(i, x))
        return m, images

    @torch.no_grad()
    def measure(self) -> dict[str, dict[str, float]]:
        from common import adapters as ad
        from common.losses import kept_share
        from common.metrics import paired_similarity, target_kind

        tr = self.tr
        out = {}
        for split, prompts in self.prompts.items():
            if split not in self.reference:
                with ad.adapters_disabled(tr.comps):
                    self.reference[split] = self._measure(prompts)
            (ref, ref_images), (m, images) = self.reference[split], self._measure(prompts)
            s = m.summarize(n_boot=0)
            row = {f"{a.name}_{target_kind(a)}": s["mean"][f"{a.name}_{target_kind(a)}"] for a in tr.attrs}
            pred, ref_pred = m.pred, ref.pred
            for a in tr.keep_heads:  # share of images whose kept attribute reads as the original image's
                row[f"{a}_kept"] = float(np.nanmean([kept_share(pred[a][m.prompt == i], ref_pred[a][ref.prompt == i])
                                                     for i in images]))
            row["valid_rate"] = s["mean"]["face_rate"]
            sims = [float(paired_similarity(images[i], ref_images[i], enc).mean())
                    for i in images for enc in tr.judges.encoders.values()]
            row["similarity"] = float(np.mean(sims)) if sims else float("nan")
            out[split] = row
        return out


def run_probe(out: str | Path, config: str | Path = DEFAULT_CONFIG, steps: int = 150, every: int = 50,
              train_set: str = "all", images: int = 32, n_prompts: int = 8, overrides: list[str] | None = None) -> list[dict]:
    """Train and measure as the module says; returns the rows written to OUT/probe.csv."""
    from common.config import load_config
    from common.metrics import target_kind
    from common.toy.world import ToyWorld
    from common.train import Trainer

    if every < 1 or steps < every:
        raise ValueError(f"--every must be in [1, --steps]; got every={every}, steps={steps}")
    out = Path(out)
    world = ToyWorld()
    pairs = training_pairs(world, train_set)
    out.mkdir(parents=True, exist_ok=True)
    # the training set reaches the trainer as a prompt file named by the config (it decides prompts.train)
    train_file = (out / "train_prompts.txt").resolve()
    train_file.write_text("".join(world.prompt(world.occupation(*p)) + "\n" for p in pairs))
    cfg = load_config(config, [f"paths.output_dir={out / 'run'}", "train.validate_every=0", "train.checkpoint_every=0",
                               "train.permanent_every=0", f"train.max_steps={steps}", *(overrides or []),
                               f"prompts.train={json.dumps([str(train_file)])}"])
    tr = Trainer(cfg)
    probe = Probe(tr, {"train": measured_prompts(world, pairs, n_prompts),
                       "heldout": measured_prompts(world, world.heldout_pairs, n_prompts)}, images)
    columns = ["step", "weights", "split", *(f"{a.name}_{target_kind(a)}" for a in tr.attrs),
               *(f"{a}_kept" for a in tr.keep_heads), "valid_rate", "similarity", "minutes"]
    t0, rows = time.time(), []
    with open(out / "probe.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, columns)
        w.writeheader()

        def record(weights: str):
            for split, m in probe.measure().items():
                row = {"step": tr.step_count, "weights": weights, "split": split, **{k: round(v, 4) for k, v in m.items()},
                       "minutes": round((time.time() - t0) / 60, 2)}
                rows.append(row)
                w.writerow(row)
                fh.flush()
                print(" ".join(f"{k}={row[k]}" for k in columns), flush=True)

        record("main")
        # the trainer's own loop; max_steps stays the run's length (the lr schedule's horizon)
        tr.fit(on_step=lambda s: record("main") if s % every == 0 or s == steps else None)
        with tr.ema.swapped():
            record("ema")
    return rows


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(prog="python -m research.toy_probe", description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--config", default=str(DEFAULT_CONFIG))
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--train-set", default="all", help="all | per-word:N | direction:long|short")
    ap.add_argument("--images", type=int, default=32, help="images per measured prompt")
    ap.add_argument("--prompts", type=int, default=8, help="measured occupations per split")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    try:
        return run_probe(a.out, a.config, a.steps, a.every, a.train_set, a.images, a.prompts, a.overrides)
    except ValueError as e:
        ap.error(str(e))


if __name__ == "__main__":
    main()
