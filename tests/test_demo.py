"""`make demo` shortened: the whole pipeline (train -> generate -> evaluate) on the shipped toy world, and the method's
effect. The oracle is the base model itself: the same noise, prompts and judges before and after finetuning."""

import json

import pytest
import torch

STEPS, IMAGES, PROMPTS = 60, 32, 4
"""the shortened demo: 60 training steps (the full demo trains 500), 32 images per prompt (128), 4 prompts per split
(8)"""


@pytest.fixture(scope="module")
def short_demo(tmp_path_factory):
    from common.toy.demo import run_demo

    out = tmp_path_factory.mktemp("demo")
    threads = torch.get_num_threads()
    s = run_demo(out, images=IMAGES, n_prompts=PROMPTS, overrides=[
        f"train.max_steps={STEPS}", "train.validate_every=0", "train.checkpoint_every=0", "train.permanent_every=0",
    ])
    assert torch.get_num_threads() == threads
    print({k: round(v, 3) for k, v in s.items()})
    return out, s


@pytest.mark.slow
def test_short_demo_writes_its_report(short_demo):
    """Every file of the report; summary.json is what run_demo returned; age (not debiased) changed on the share of
    images that results.csv's two sets, joined on (prompt, image), give."""
    import csv

    out, s = short_demo
    assert json.loads((out / "summary.json").read_text()) == pytest.approx(s, nan_ok=True)
    for split, prefix in (("train", "train_"), ("heldout", "")):
        ev = out / split / "eval"
        assert (ev / "per_prompt.csv").is_file() and (ev / "frequency_gender.png").is_file()
        assert any((ev / "grids").iterdir())
        assert (out / split / "pairs.png").is_file()
        rows = list(csv.DictReader(open(ev / "results.csv", newline="")))
        orig = {(r["prompt_index"], r["image_index"]): r["age_pred"] for r in rows if r["set"] == "original"}
        pairs = [(r["age_pred"], orig[(r["prompt_index"], r["image_index"])]) for r in rows if r["set"] == "debiased"]
        pairs = [(x, y) for x, y in pairs if x and y]
        assert len(pairs) > IMAGES * PROMPTS / 2 and s[f"{prefix}age_changed_after"] == pytest.approx(
            sum(x != y for x, y in pairs) / len(pairs), abs=1e-12)
        assert "gender_changed_after" not in s and "train_race_changed_after" not in s


@pytest.mark.slow
def test_short_demo_reduces_bias_on_both_splits(short_demo):
    """The toy world's design: the base model shows its designed held-out bias (gender >= 0.6, race >= 0.25), and the
    shortened demo lowers gender, race and gender x race bias on both splits, with the people kept (similarity >=
    0.9) and at most 10% of images degraded: the full demo's acceptance numbers where 60 steps can meet them."""
    _, s = short_demo
    assert s["gender_bias_before"] >= 0.6 and s["race_bias_before"] >= 0.25
    for prefix in ("train_", ""):
        for a in ("gender", "race", "gender_race"):
            assert s[f"{prefix}{a}_bias_after"] < s[f"{prefix}{a}_bias_before"], (prefix, a)
    assert s["similarity_after"] >= 0.9 and s["degraded_rate_after"] <= 0.10


_SHORT = f"{STEPS} steps, {IMAGES} images per prompt"


@pytest.mark.slow
@pytest.mark.parametrize("key, bound", [
    pytest.param("gender_bias_after", 0.30, marks=pytest.mark.xfail(strict=True, reason=(
        f"{_SHORT}: measured 0.382; the full demo (500 steps, 128 images) measured 0.162"))),
    ("race_bias_after", 0.15),
    pytest.param("train_gender_bias_after", 0.15, marks=pytest.mark.xfail(strict=True, reason=(
        f"{_SHORT}: measured 0.422; at 32 images even a fair model scores 0.139 (gender_bias_floor)"))),
    pytest.param("train_race_bias_after", 0.10, marks=pytest.mark.xfail(strict=True, reason=(
        f"{_SHORT}: measured 0.137; at 32 images even a fair model scores 0.099 (race_bias_floor)"))),
])
def test_short_demo_against_the_full_demos_bias_targets(short_demo, key, bound):
    """The full demo's acceptance bounds after finetuning (held-out gender <= 0.30, race <= 0.15; training gender <=
    0.15, race <= 0.10), asserted as designed; the shortened run misses three of them (xfail, with the figure)."""
    assert short_demo[1][key] <= bound


def test_pairs_grid_puts_each_original_above_its_debiased_image(tmp_path):
    """Hand-made PNGs (each a flat colour that encodes set, prompt and image): the tile at row 2i (2i+1), column j is
    prompt i's original (debiased) image j, upscaled by `scale` inside 1-px white padding."""
    import numpy as np
    from PIL import Image

    from common.toy.demo import pairs_grid

    def colour(s, i, j):
        return np.array([40 + 100 * s, 10 + 30 * i, 5 + 10 * j], np.uint8)

    for s, name in enumerate(("original", "debiased")):
        for i in range(2):
            (tmp_path / name / f"prompt_{i}").mkdir(parents=True)
            for j in range(3):
                img = np.broadcast_to(colour(s, i, j), (32, 32, 3)).copy()
                Image.fromarray(img).save(tmp_path / name / f"prompt_{i}" / f"img_{j}.png")
    g = np.asarray(Image.open(pairs_grid(tmp_path, n_prompts=2, per_prompt=3, scale=2)))
    tile = 32 * 2 + 1
    assert g.shape == (4 * tile + 1, 3 * tile + 1, 3)
    for i in range(2):
        for s in range(2):
            for j in range(3):
                y, x = 1 + (2 * i + s) * tile, 1 + j * tile
                assert (g[y : y + 64, x : x + 64] == colour(s, i, j)).all(), (i, s, j)
                assert (g[y + 64, x : x + 64] == 255).all()  # padding below every tile
