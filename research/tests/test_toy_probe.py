"""research/toy_probe.py: the training sets it offers, and a two-step probe whose step-0 row is the original model."""

from collections import Counter

import pytest

from common.toy.world import ToyWorld
from research.toy_probe import run_probe, training_pairs


def test_training_sets():
    w = ToyWorld()
    assert training_pairs(w, "all") == w.train_pairs
    few = training_pairs(w, "per-word:1")  # every field word and every role word exactly once
    assert sorted(Counter(f for f, _ in few).values()) == [1] * len(w.fields)
    assert sorted(Counter(r for _, r in few).values()) == [1] * len(w.roles)
    assert set(few) <= set(w.train_pairs)
    long = training_pairs(w, "direction:long")
    assert long and all(f % 2 == 0 for f, _ in long) and len(long) == len(w.train_pairs) // 2
    for bad in ("some", "per-word:0", "per-word:x", "direction:up"):
        with pytest.raises(ValueError, match="--train-set"):
            training_pairs(w, bad)


def test_probe_step_zero_is_the_original_model(tmp_path):
    """Before any step the LoRA is zero: the measured images ARE the reference images (similarity 1 up to float32
    rounding; the rows keep 4 decimals) and every kept attribute reads as the original's (age_kept 1); every row of
    the CSV is written. exp-3's toy config back-propagates through 4 steps: 2 here, the whole shortened chain."""
    rows = run_probe(tmp_path, steps=2, every=2, images=4, n_prompts=2,
                     overrides=["sampling.train_steps=[2, 2]", "sampling.dft_last_k=2", "loss.keep=[age]"])
    assert [(r["step"], r["weights"], r["split"]) for r in rows] == [
        (0, "main", "train"), (0, "main", "heldout"), (2, "main", "train"), (2, "main", "heldout"),
        (2, "ema", "train"), (2, "ema", "heldout")]
    for r in rows[:2]:
        assert r["similarity"] == pytest.approx(1.0, abs=1e-4) and r["age_kept"] == 1.0
        assert 0 <= r["gender_bias"] <= 1 and 0 <= r["race_bias"] <= 0.5 and 0 <= r["valid_rate"] <= 1
    assert (tmp_path / "probe.csv").read_text().count("\n") == len(rows) + 1


def test_probe_columns_follow_the_configs_attributes(tmp_path):
    """exp-4's toy config trains gender, race and age: the CSV has one column per attribute, age included; age's
    target is 75/25, so its column is the gap to that target (at most 0.75: every image old), not the bias, which
    would score the target itself as biased."""
    from pathlib import Path

    cfg = Path(__file__).resolve().parents[2] / "exp-4-debias-gender-race-age/configs/toy.yaml"
    rows = run_probe(tmp_path, cfg, steps=1, every=1, images=2, n_prompts=1, overrides=["sampling.train_steps=[2, 2]"])
    header = (tmp_path / "probe.csv").read_text().splitlines()[0].split(",")
    assert header == ["step", "weights", "split", "gender_bias", "race_bias", "age_gap", "valid_rate", "similarity",
                      "minutes"]
    assert len(rows) == 6 and all(0 <= r["age_gap"] <= 0.75 for r in rows)
