"""How local are a toy build's edits, and how strictly does the toy image encoder read "the same scene"?

Two measurements; the judges (classifier, image encoder) are always the shipped ones, `--build` swaps the generator,
and the cosine is the demo's similarity (`common.metrics.paired_similarity`):

1. Word edits of the BASE model: each measured held-out prompt is sampled from the same noise with and without an
   attribute word in front of the occupation ("a photo of the face of a long-haired arctic director, a person"). Each
   pair is put in one bucket by what the classifier reads differently (`gender`, `race`, `age` when only that flipped,
   `several`, `none`; a pair with a rejected face in either image goes to `no_face`) and gets the encoder's cosine,
   and, with `--shift-search`, the best cosine over small translations of the edited image (what is left when the
   face's position is forgiven).
2. Encoder sensitivity: renders of the same people with one group of drawing parameters moved by a fixed amount
   (pixels), against the unmoved renders.

    python -m research.toy_locality --out outputs/locality --guidance 1.6 --shift-search
    python -m research.toy_locality --out outputs/locality_b --build /tmp/toy_rebuild   # another build's U-Net

Writes OUT/word_edits.csv (word, bucket, pairs, cosine[, best_shift_cosine]) and OUT/sensitivity.csv (parameters,
delta, cosine) and prints both.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

WORDS = ("long-haired", "short-haired", "dark-skinned", "light-skinned")
SENSITIVITY = {  # parameter group -> moved fields of `People`
    "face centre x": ("cx",),
    "face centre y": ("cy",),
    "face radii": ("rx", "ry"),
    "body size": ("body_w", "body_h"),
    "background shading": ("bg_grad",),
}
DELTAS = {"background shading": (0.01, 0.02, 0.05)}
"""per group, the amounts to move by (default (0.1, 0.25, 0.5, 1.0) pixels; the shading is a relative gradient)"""


def shift(images: torch.Tensor, dx: float, dy: float) -> torch.Tensor:
    """Translate images [N, 3, H, W] by (dx, dy) pixels (bilinear, border colour repeated)."""
    n, _, h, w = images.shape
    theta = torch.tensor([[1.0, 0.0, -2 * dx / w], [0.0, 1.0, -2 * dy / h]], dtype=images.dtype)
    grid = F.affine_grid(theta.expand(n, 2, 3), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, padding_mode="border", align_corners=False)


def edit_prompt(world, prompt: str, word: str) -> str:
    """The evaluation prompt with `word` in front of its occupation (the place the training captions name it)."""
    for occupation in world.train_occupations + world.heldout_occupations:
        if world.prompt(occupation) == prompt:
            return world.prompt(f"{word} {occupation}".strip()) if word else prompt
    raise ValueError(f"'{prompt}' is not the evaluation prompt of a toy occupation")


def buckets(orig: dict[str, torch.Tensor], edit: dict[str, torch.Tensor]) -> list[str]:
    """Per pair, what the classifier reads differently: one attribute's name, `several`, `none`, or `no_face` when
    either prediction is -1 (rejected). `orig`, `edit`: attribute -> predicted class [N]."""
    attrs = list(orig)
    out = []
    for i in range(len(orig[attrs[0]])):
        if any(int(orig[a][i]) < 0 or int(edit[a][i]) < 0 for a in attrs):
            out.append("no_face")
            continue
        changed = [a for a in attrs if int(orig[a][i]) != int(edit[a][i])]
        out.append("none" if not changed else changed[0] if len(changed) == 1 else "several")
    return out


@torch.no_grad()
def word_edits(comps, detector, classifier, encoder, world, prompts: list[str], words=WORDS, images: int = 64,
               guidance: float = 1.6, steps: int = 15, shift_search: bool = False) -> list[dict]:
    """Rows (word, bucket, pairs, cosine[, best_shift_cosine]) pooled over `prompts`, `images` noises each."""
    from tqdm import tqdm

    from common.generate import noise_for
    from common.judges import Judges
    from common.metrics import paired_similarity
    from common.sampling import sample

    judges = Judges(classifier, detector)
    offsets = [(a / 4, b / 4) for a in range(-6, 7) for b in range(-6, 7)]  # +-1.5 px in quarter pixels
    acc: dict[tuple[str, str], list[list[float]]] = {}
    bar = tqdm(total=len(prompts) * (1 + len(words)), desc="word edits", leave=False)
    for p in prompts:
        noise = noise_for(p, range(images), comps.latent_shape())
        base = sample(comps, [p] * images, noise, steps, guidance=guidance).images
        j0 = judges.judge(base)
        bar.update()
        for word in words:
            im = sample(comps, [edit_prompt(world, p, word)] * images, noise, steps, guidance=guidance).images
            cos = paired_similarity(im, base, encoder)
            best = None
            if shift_search:
                best = torch.stack([paired_similarity(shift(im, dx, dy), base, encoder) for dx, dy in offsets]).max(0).values
            for i, b in enumerate(buckets(j0.pred, judges.judge(im).pred)):
                slot = acc.setdefault((word, b), [[], []])
                slot[0].append(float(cos[i]))
                if best is not None:
                    slot[1].append(float(best[i]))
            bar.update()
    bar.close()
    rows = []
    for (word, b), (c, s) in acc.items():
        row = {"word": word, "bucket": b, "pairs": len(c), "cosine": round(float(np.mean(c)), 4)}
        if s:
            row["best_shift_cosine"] = round(float(np.mean(s)), 4)
        rows.append(row)
    return rows


@torch.no_grad()
def encoder_sensitivity(world, encoder, n: int = 512, seed: int = 0) -> list[dict]:
    """Rows (parameters, delta, cosine): mean cosine between renders of `n` people and the same people with one
    parameter group moved by delta."""
    from common.metrics import paired_similarity
    from common.toy.world import to_tensor

    people = world.sample_balanced(np.random.default_rng(seed), n)
    ref = to_tensor(world.render(people))
    rows = []
    for name, fields in SENSITIVITY.items():
        for d in DELTAS.get(name, (0.1, 0.25, 0.5, 1.0)):
            moved = dataclasses.replace(people, **{k: getattr(people, k) + np.float32(d) for k in fields})
            cos = paired_similarity(to_tensor(world.render(moved)), ref, encoder).mean()
            rows.append({"parameters": name, "delta": d, "cosine": round(float(cos), 4)})
    return rows


def _write(path: Path, rows: list[dict]) -> None:
    cols = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, cols)
        w.writeheader()
        w.writerows(rows)
    for r in rows:
        print(" ".join(f"{k}={r.get(k, '')}" for k in cols), flush=True)


def main(argv=None) -> tuple[list[dict], list[dict]]:
    from common.toy.demo import measured_prompts
    from common.toy.judges import ToyDetector, load_classifier, load_image_encoder
    from common.toy.models import load_toy_components
    from common.toy.world import ToyWorld

    ap = argparse.ArgumentParser(prog="python -m research.toy_locality", description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--build", default=None, help="toy build folder of the U-Net and text encoder (default data/toy)")
    ap.add_argument("--guidance", type=float, default=1.6)
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--images", type=int, default=64, help="noises per measured prompt")
    ap.add_argument("--prompts", type=int, default=8, help="measured held-out occupations")
    ap.add_argument("--shift-search", action="store_true", help="also the best cosine over +-1.5 px translations")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    if a.images < 1 or a.prompts < 1 or a.steps < 1:
        ap.error(f"--images, --prompts and --steps must be >= 1; got {a.images}, {a.prompts}, {a.steps}")
    torch.set_num_threads(a.threads)
    world, classifier, encoder = ToyWorld(), load_classifier(), load_image_encoder()
    comps = load_toy_components(path=a.build)
    prompts = measured_prompts(world, world.heldout_pairs, a.prompts)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    edits = word_edits(comps, ToyDetector(classifier=classifier), classifier, encoder, world, prompts,
                       images=a.images, guidance=a.guidance, steps=a.steps, shift_search=a.shift_search)
    _write(out / "word_edits.csv", edits)
    sens = encoder_sensitivity(world, encoder)
    _write(out / "sensitivity.csv", sens)
    return edits, sens


if __name__ == "__main__":
    main()
