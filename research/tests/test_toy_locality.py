"""research/toy_locality.py: the prompt edit, the buckets, the translation, the encoder sensitivity and a tiny CLI run."""

import csv
import dataclasses

import numpy as np
import pytest
import torch

from common.toy.world import ToyWorld, to_tensor
from research.toy_locality import buckets, edit_prompt, encoder_sensitivity, main, shift


def test_edit_prompt_puts_the_word_in_front_of_the_occupation():
    w = ToyWorld()
    occ = w.heldout_occupations[0]
    assert edit_prompt(w, w.prompt(occ), "long-haired") == f"a photo of the face of a long-haired {occ}, a person"
    assert edit_prompt(w, w.prompt(occ), "") == w.prompt(occ)
    with pytest.raises(ValueError, match="not the evaluation prompt"):
        edit_prompt(w, "a photo of a cat", "long-haired")


def test_buckets_by_hand():
    t = lambda *v: torch.tensor(v)  # noqa: E731
    orig = {"gender": t(0, 0, 1, 1, 0, -1), "race": t(2, 2, 3, 3, 1, -1)}
    edit = {"gender": t(0, 1, 0, 1, -1, 0), "race": t(2, 2, 1, 0, 1, 2)}
    assert buckets(orig, edit) == ["none", "gender", "several", "race", "no_face", "no_face"]


def test_shift_moves_content_by_whole_pixels():
    """A one-pixel translation equals rolling the image by one column (away from the border it repeats)."""
    x = torch.rand(2, 3, 16, 16)
    moved = shift(x, 1.0, 0.0)
    assert torch.allclose(moved[..., 1:], x[..., :-1], atol=1e-5)
    assert torch.allclose(shift(x, 0.0, 2.0)[..., 2:, :], x[..., :-2, :], atol=1e-5)
    assert torch.allclose(shift(x, 0.0, 0.0), x, atol=1e-6)


def test_encoder_sensitivity_matches_a_direct_computation():
    """Each row is the mean cosine between the renders and the renders with the named fields moved: recomputed here
    for the face centre moved by 1 px. Moving further reads as less alike (the encoder tells people apart by these)."""
    from common.toy.judges import load_image_encoder

    w, enc = ToyWorld(), load_image_encoder()
    rows = encoder_sensitivity(w, enc, n=16, seed=3)
    got = {(r["parameters"], r["delta"]): r["cosine"] for r in rows}
    people = w.sample_balanced(np.random.default_rng(3), 16)
    moved = dataclasses.replace(people, cx=people.cx + np.float32(1.0))
    with torch.no_grad():
        want = (enc(to_tensor(w.render(people))) * enc(to_tensor(w.render(moved)))).sum(-1).mean()
    assert got[("face centre x", 1.0)] == pytest.approx(float(want), abs=1e-4)
    assert got[("face centre x", 0.1)] > got[("face centre x", 1.0)]


def test_cli_tiny_run(tmp_path):
    """2 noises, 1 prompt, 2 steps: every word's pairs are bucketed (2 per word) and both CSVs are written."""
    edits, sens = main(["--out", str(tmp_path), "--images", "2", "--prompts", "1", "--steps", "2", "--threads", "1",
                        "--shift-search"])
    per_word = {}
    for r in edits:
        per_word[r["word"]] = per_word.get(r["word"], 0) + r["pairs"]
        assert -1 <= r["cosine"] <= r["best_shift_cosine"] + 1e-6  # the search includes the unmoved image
    assert per_word == {w: 2 for w in ("long-haired", "short-haired", "dark-skinned", "light-skinned")}
    with open(tmp_path / "word_edits.csv") as fh:
        assert len(list(csv.DictReader(fh))) == len(edits)
    with open(tmp_path / "sensitivity.csv") as fh:
        assert len(list(csv.DictReader(fh))) == len(sens) == 4 * 4 + 3
