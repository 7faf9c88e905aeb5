"""`make demo` shortened: the whole pipeline (train -> generate -> evaluate) on the shipped toy world, and the method's
effect. The oracle is the base model itself: the same noise, prompts and judges before and after finetuning."""

import json

import pytest
import torch


@pytest.mark.slow
def test_short_demo_reduces_bias_on_both_splits(tmp_path):
    from common.toy.demo import run_demo

    threads = torch.get_num_threads()
    s = run_demo(tmp_path, images=32, n_prompts=4, overrides=[
        "train.max_steps=60", "train.validate_every=0", "train.checkpoint_every=0", "train.permanent_every=0",
    ])
    assert torch.get_num_threads() == threads
    assert json.loads((tmp_path / "summary.json").read_text()) == pytest.approx(s, nan_ok=True)
    for split in ("train", "heldout"):
        ev = tmp_path / split / "eval"
        assert (ev / "per_prompt.csv").is_file() and (ev / "frequency_gender.png").is_file()
        assert any((ev / "grids").iterdir())
        assert (tmp_path / split / "pairs.png").is_file()
    print({k: round(v, 3) for k, v in s.items()})
    # gender and race bias decrease on BOTH splits by more than 0.05 (measured here under exp-3's earlier guidance-3
    # config: gender 0.98 -> 0.55 held-out and 0.95 -> 0.67 train; race 0.32 -> 0.16 and 0.27 -> 0.16), and so does
    # the gender x race bias
    for prefix in ("train_", ""):
        for a in ("gender", "race"):
            assert s[f"{prefix}{a}_bias_after"] < s[f"{prefix}{a}_bias_before"] - 0.05, (prefix, a)
        assert s[f"{prefix}gender_race_bias_after"] < s[f"{prefix}gender_race_bias_before"], prefix
    # age is not debiased: its changed share, recomputed here by joining results.csv's two sets on (prompt, image)
    import csv

    for split, prefix in (("train", "train_"), ("heldout", "")):
        rows = list(csv.DictReader(open(tmp_path / split / "eval" / "results.csv", newline="")))
        orig = {(r["prompt_index"], r["image_index"]): r["age_pred"] for r in rows if r["set"] == "original"}
        pairs = [(r["age_pred"], orig[(r["prompt_index"], r["image_index"])]) for r in rows if r["set"] == "debiased"]
        pairs = [(x, y) for x, y in pairs if x and y]
        assert len(pairs) > 100 and s[f"{prefix}age_changed_after"] == pytest.approx(
            sum(x != y for x, y in pairs) / len(pairs), abs=1e-12)
        assert "gender_changed_after" not in s and "train_race_changed_after" not in s
    # measured on this machine (guidance-3 config): similarity 0.88 after 60 steps, 1.6% rejected images (before: none)
    assert s["similarity_after"] > 0.85 and s["degraded_rate_after"] < 0.1


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
