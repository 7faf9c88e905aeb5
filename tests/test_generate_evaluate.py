"""generate -> evaluate -> table on tiny components (32 px, 2 steps): stable noise across processes, determinism across
images-per-prompt counts and runs, resuming, the authors' pickle structure, metrics recomputed from it by brute force,
and the reproduce table beside the published numbers."""

import itertools
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from common import evaluate as E
from common import generate as G
from common.plots import to_pil

PROMPTS = ["a photo of the face of a cardiologist, a person", "a photo of the face of a geologist, a person"]
STEPS = 2


@pytest.fixture(scope="module")
def comps():
    from common.models import tiny_components

    return tiny_components(seed=0, image_size=32)


def _pixels(path):
    return np.array(Image.open(path).convert("RGB"))


def test_stable_seed_is_independent_of_the_process_hash_seed():
    # oracle: a fresh interpreter with another PYTHONHASHSEED (which changes Python's hash() of every str) must draw
    # the same noise as this process; the authors' hash(prompt)-based seeds fail exactly this
    code = ("import sys, torch; from common.generate import noise_for; "
            f"torch.save(noise_for({PROMPTS[0]!r}, [0, 3], (4, 4, 4)), sys.argv[1]); print(hash('x'))")
    env = dict(os.environ, PYTHONHASHSEED=str(hash("seed") % 1000 + 1), PYTHONPATH=os.getcwd())
    path = f"/tmp/_fd_noise_{os.getpid()}.pt"
    r = subprocess.run([sys.executable, "-c", code, path], env=env, capture_output=True, text=True, check=True)
    other = torch.load(path)
    os.remove(path)
    assert r.stdout.strip() != str(hash("x"))  # Python's hash differs between the two processes ...
    torch.testing.assert_close(other, G.noise_for(PROMPTS[0], [0, 3], (4, 4, 4)), rtol=0, atol=0)  # ... the noise not


def test_noise_rows_depend_only_on_prompt_and_index():
    ten = G.noise_for(PROMPTS[0], range(10), (4, 4, 4))
    assert torch.equal(ten[:5], G.noise_for(PROMPTS[0], range(5), (4, 4, 4)))
    assert torch.equal(ten[7], G.noise_for(PROMPTS[0], [7], (4, 4, 4))[0])
    assert not torch.equal(ten[0], G.noise_for(PROMPTS[1], [0], (4, 4, 4))[0])
    assert not torch.equal(ten[0], ten[1])
    assert G.stable_seed("a", 0) != G.stable_seed("a", 0, base=1998) and 0 <= G.stable_seed("a", 0) < 2**63


def test_first_images_identical_for_5_and_10_per_prompt_and_across_runs(comps, make_tiny, tmp_path):
    kw = dict(steps=STEPS, batch_size=5, progress=False)
    m5 = G.generate_to_dir(comps, PROMPTS, tmp_path / "n5", 5, **kw)
    G.generate_to_dir(comps, PROMPTS, tmp_path / "n10", 10, **kw)
    fresh = make_tiny(seed=0, image_size=32)  # a second, independently built model: a separate run
    G.generate_to_dir(fresh, PROMPTS[:1], tmp_path / "again", 5, **kw)
    assert m5["seeds"]["1"] == [G.stable_seed(PROMPTS[1], j) for j in range(5)]
    for i, j in itertools.product(range(2), range(5)):
        a = _pixels(G.image_path(tmp_path / "n5", i, j))
        assert np.array_equal(a, _pixels(G.image_path(tmp_path / "n10", i, j)))
        if i == 0:
            assert np.array_equal(a, _pixels(G.image_path(tmp_path / "again", i, j)))
    # another batch composition (here: the in-memory API, 2 images in one batch) changes only the floating-point
    # summation order: at most one uint8 level
    imgs = G.generate(comps, PROMPTS, [1, 4], steps=STEPS, batch_size=5, progress=False)
    assert imgs.shape == (2, 2, 3, 32, 32)
    for i, (k, j) in itertools.product(range(2), enumerate([1, 4])):
        d = np.abs(np.asarray(to_pil(imgs[i, k])).astype(int) - _pixels(G.image_path(tmp_path / "n5", i, j)))
        assert d.max() <= 1


def test_cli_resumes_and_refuses_other_settings(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "img"
    base = ["--model", "tiny", "--prompts", str(prompts), "--out", str(out), "--steps", str(STEPS),
            "--image-size", "32", "--batch-size", "4"]
    m = G.main(base + ["--images-per-prompt", "2"])
    assert m["generated_this_run"] == 4 and m["complete"]
    first = G.image_path(out, 0, 0).stat().st_mtime_ns
    m = G.main(base + ["--images-per-prompt", "3"])
    assert m["generated_this_run"] == 2 and m["images_per_prompt"] == 3
    assert G.image_path(out, 0, 0).stat().st_mtime_ns == first  # finished images are skipped, not redone
    m = G.main(base + ["--images-per-prompt", "3"])  # everything exists: nothing to do (the authors crashed here)
    assert m["generated_this_run"] == 0 and m["complete"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["prompts"] == PROMPTS and manifest["steps"] == STEPS and manifest["guidance"] == 7.5
    with pytest.raises(ValueError, match="steps = 2, not 3"):
        G.main(base[:-4] + ["--steps", "3", "--image-size", "32", "--images-per-prompt", "3"])


def test_prefix_tokens_switch_to_the_unmasked_conditioning(make_tiny, tmp_path):
    from common import adapters as ad

    trained = make_tiny(seed=0, image_size=32)
    tokens = ad.add_prefix_tokens(trained, 2, seed=0)
    ad.save_lora(trained, tmp_path / "prefix")
    c = make_tiny(seed=0, image_size=32)
    info = G.load_adapters(c, prefix=str(tmp_path / "prefix"))
    assert info["kind"] == "prefix" and info["tokens"] == tokens
    assert c.prompt_prefix == "".join(tokens)
    assert G.default_conditioning(c) == "reference_unmasked"  # the authors' exp-2 path (docs/method.md#conditioning)
    assert G.default_conditioning(make_tiny(seed=0, image_size=32)) == "reference"
    with pytest.raises(ValueError, match="pass one of --lora, --prefix"):
        G.load_adapters(c, lora="x", prefix="y")


def _brute_bias(counts):
    f = np.asarray(counts, dtype=float) / sum(counts)
    pairs = list(itertools.combinations(range(len(f)), 2))
    return sum(abs(f[a] - f[b]) for a, b in pairs) / len(pairs)


def test_evaluate_end_to_end_matches_its_own_pickle(comps, make_tiny, tmp_path):
    from common import adapters as ad

    G.generate_to_dir(comps, PROMPTS, tmp_path / "orig", 4, steps=STEPS, progress=False)
    debiased = make_tiny(seed=0, image_size=32)  # a visibly different model: text-encoder LoRA with non-zero B
    ad.add_lora(debiased, text_encoder=True, unet=False, rank=2)
    with torch.no_grad():
        for p in ad.trainable_parameters(debiased).values():
            p.normal_(0, 0.5)
    G.generate_to_dir(debiased, PROMPTS, tmp_path / "deb", 4, steps=STEPS, progress=False)
    out = tmp_path / "eval"
    E.main(["--images", str(tmp_path / "deb"), "--reference", str(tmp_path / "orig"), "--out", str(out),
            "--classifiers", "random-fairface8", "--classifier-input-size", "64", "--detector", "whole-image",
            "--clip-model", "tiny", "--image-encoders", "tiny-clip", "tiny-dino", "--n-boot", "100",
            "--grid-tile", "32"])
    for f in ("results.csv", "summary.md", "summary.csv", "per_prompt.csv", "summary.json", "frequency_gender.png",
              "grids/debiased/prompt_1.jpg", "grids/original/prompt_0.jpg", "reference_test_results.pkl"):
        assert (out / f).is_file(), f
    res = pickle.loads((out / "test_results.pkl").read_bytes())
    assert isinstance(res, list) and len(res) == 5
    found, boxes, gender, race, age = res
    assert sorted(found) == [0, 1] and found[0].dtype == torch.bool and boxes[1].dtype == torch.int64
    assert gender[0].shape == (4, 2) and race[1].shape == (4, 4) and age[0].shape == (4, 2)
    assert boxes[0].tolist() == [[0, 0, 32, 32]] * 4  # whole-image detector, square 32 px images

    # oracle 1: the classifier run by hand on the whole image resized to its input (what the whole-image crop is)
    from common.classifiers import load_classifier

    clf = load_classifier("random-fairface8", input_size=64)
    x = torch.from_numpy(_pixels(tmp_path / "deb" / "prompt_1" / "img_2.png")).permute(2, 0, 1)[None].float()
    x = torch.nn.functional.interpolate(x / 127.5 - 1, size=(64, 64), mode="bilinear", align_corners=False)
    with torch.no_grad():
        want = clf(x)
    torch.testing.assert_close(gender[1][2], want["gender"][0], atol=1e-4, rtol=1e-4)  # fp32 conv ordering only

    # oracle 2: bias per prompt recomputed from the pickle by brute-force pair enumeration
    summary = json.loads((out / "summary.json").read_text())["summaries"]["debiased"]
    for i in (0, 1):
        g = gender[i].argmax(1)[found[i]].numpy()
        r = race[i].argmax(1)[found[i]].numpy()
        assert summary["per_prompt"]["gender_bias"][str(i)] == pytest.approx(_brute_bias(np.bincount(g, minlength=2)))
        assert summary["per_prompt"]["race_bias"][str(i)] == pytest.approx(_brute_bias(np.bincount(r, minlength=4)))
        cells = np.bincount(4 * g + r, minlength=8)
        assert summary["per_prompt"]["gender_race_bias"][str(i)] == pytest.approx(_brute_bias(cells))
    # CLIP-I / DINO are present for the debiased set, paired with the reference; CLIP-T for both
    assert {"clip_t", "clip_i", "dino"} <= set(summary["mean"])
    rows = (out / "results.csv").read_text().splitlines()
    assert len(rows) == 1 + 16 and rows[0].startswith("set,prompt_index,prompt,image_index")
    md = (out / "summary.md").read_text()
    assert "| gender_race_bias |" in md and "| debiased | original |" in md


def test_reproduce_prints_table_beside_published_numbers(tmp_path, capsys):
    from common import adapters as ad
    from common import reproduce as R
    from common.models import tiny_components

    c = tiny_components(seed=0)
    ad.add_lora(c, text_encoder=True, unet=False, rank=2)
    ad.save_lora(c, tmp_path / "lora")
    res = R.main(["--experiment", "exp-3", "--lora", str(tmp_path / "lora"), "--model", "tiny", "--image-size", "32",
                  "--steps", str(STEPS), "--limit-prompts", "2", "--images-per-prompt", "2", "--classifier",
                  "random-fairface8", "--classifier-input-size", "64", "--detector", "whole-image", "--clip-model", "",
                  "--image-encoders", "tiny-dino", "--n-boot", "50", "--out", str(tmp_path / "rep")])
    table = res["table"]
    # occupation.json's first test prompts include the cardiologist the project page shows (exp-3's README)
    assert "| a photo of the face of a cardiologist, a person | gender_bias |" in table
    assert "0.00 → 0.10" in table  # the published cardiologist gender bias, original -> debiased
    assert "not available" in table and "| dino |" in table
    assert (tmp_path / "rep" / "reproduce.md").read_text() == table
    assert "exp-3" in capsys.readouterr().out
    from common.runtime import UsageError

    with pytest.raises(UsageError, match="no debiased weights"):
        R.main(["--experiment", "exp-3", "--model", "tiny"])
