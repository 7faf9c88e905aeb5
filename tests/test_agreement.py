"""Judge agreement (issue #22): `common.metrics.agreement` against hand-computed fractions, and `common.evaluate
--judge2` on toy-world image folders, checked against the per-image predictions it writes to results.csv, a
confusion-matrix kappa written here, and the second judge run by hand on the same images."""

import copy
import csv
import itertools
import json
import math
import os
import subprocess
from fractions import Fraction

import numpy as np
import pytest
import torch
from PIL import Image

from common import classifiers as C
from common import evaluate as E
from common.metrics import agreement
from common.runtime import cli

# ----------------------------------------------------------------------------------------------------------------
# agreement()
# ----------------------------------------------------------------------------------------------------------------


def test_agreement_matches_a_hand_computation_with_missing_predictions():
    a = torch.tensor([0, 0, 1, 1, 2, -1, 0, 2, 1, -1])
    b = torch.tensor([0, 1, 1, 1, 2, 0, -1, 0, 1, 2])
    # compared: images 0-4, 7, 8 (5, 6, 9 lack a prediction from one judge); equal on 0, 2, 3, 4, 8 -> p_o = 5/7.
    # judge a over those 7: class counts (2, 3, 2); judge b: (2, 4, 1) -> p_e = (2*2 + 3*4 + 2*1) / 49 = 18/49;
    # kappa = (5/7 - 18/49) / (1 - 18/49) = (35 - 18) / (49 - 18) = 17/31
    share, kappa = agreement(a, b, 3)
    assert share == pytest.approx(float(Fraction(5, 7)), abs=1e-15)
    assert kappa == pytest.approx(float(Fraction(17, 31)), abs=1e-15)
    assert agreement(b, a, 3) == pytest.approx((share, kappa), abs=1e-15)  # symmetric in the two judges


def test_agreement_extremes_and_the_documented_degenerate_case():
    assert agreement(torch.tensor([0, 1, 2, -1]), torch.tensor([0, 1, 2, 1]), 3) == (1.0, 1.0)
    # systematic disagreement on a balanced binary attribute: p_o = 0, p_e = 1/2 -> kappa = -1
    assert agreement(torch.tensor([0, 1, 0, 1]), torch.tensor([1, 0, 1, 0]), 2) == (0.0, -1.0)
    # agreement no better than chance: a = (0, 0, 1, 1), b = (0, 1, 0, 1): p_o = 1/2 = p_e -> kappa 0
    assert agreement(torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 0, 1]), 2) == (0.5, 0.0)
    # p_e == 1: both judges give every compared image one and the same class -> share 1, kappa NaN (0/0)
    share, kappa = agreement(torch.tensor([1, 1, -1, 1]), torch.tensor([1, 1, 0, 1]), 2)
    assert share == 1.0 and math.isnan(kappa)
    # nothing compared (no image with a prediction from both) -> NaN, NaN
    assert all(math.isnan(v) for v in agreement(torch.tensor([-1, 0]), torch.tensor([1, -1]), 2))
    with pytest.raises(ValueError, match="one length, got 3 and 2"):
        agreement(torch.tensor([0, 1, 0]), torch.tensor([0, 1]), 2)
    with pytest.raises(ValueError, match=r"expected -1 \(no face\) or a class in \[0, 1\]"):
        agreement(torch.tensor([0, 2]), torch.tensor([0, 1]), 2)


def _kappa_from_confusion(a, b, k):
    """Cohen's kappa from the k x k confusion matrix of the images both judges predicted (a float oracle written
    independently of `agreement`'s integer counts)."""
    m = np.zeros((k, k))
    for x, y in zip(a, b):
        if x >= 0 and y >= 0:
            m[x, y] += 1
    n = m.sum()
    if n == 0:
        return float("nan"), float("nan")
    po = np.trace(m) / n
    pe = float((m.sum(1) / n) @ (m.sum(0) / n))
    return po, (po - pe) / (1 - pe) if pe < 1 else float("nan")


def test_agreement_equals_the_confusion_matrix_kappa_on_random_predictions():
    g = torch.Generator().manual_seed(0)
    for k in (2, 4, 8):
        a = torch.randint(-1, k, (200,), generator=g)
        b = torch.where(torch.rand(200, generator=g) < 0.6, a, torch.randint(-1, k, (200,), generator=g))
        want = _kappa_from_confusion(a.tolist(), b.tolist(), k)
        assert agreement(a, b, k) == pytest.approx(want, abs=1e-12)  # float rounding of the oracle only


# ----------------------------------------------------------------------------------------------------------------
# evaluate --judge2 on the toy world
# ----------------------------------------------------------------------------------------------------------------

PER_PROMPT = 6
"""toy people per prompt folder; each folder also holds one noise image that the toy detector rejects"""


def _write_set(root, seed):
    """prompt_{0,1}/img_{0..6}.png: 6 rendered toy people with balanced attributes, then one uniform-noise image."""
    from common.toy.world import ToyWorld

    rng = np.random.default_rng(seed)
    world = ToyWorld()
    for i in range(2):
        imgs = list(world.render(world.sample_balanced(rng, PER_PROMPT)))
        imgs.append(rng.integers(0, 256, imgs[0].shape, dtype=np.uint8))
        (root / f"prompt_{i}").mkdir(parents=True)
        for j, im in enumerate(imgs):
            Image.fromarray(im).save(root / f"prompt_{i}" / f"img_{j}.png")
    return root


@pytest.fixture(scope="module")
def toy_sets(tmp_path_factory):
    base = tmp_path_factory.mktemp("toy_sets")
    return _write_set(base / "debiased", 1), _write_set(base / "original", 2)


BASE = ["--classifiers", "toy", "--detector", "toy", "--image-encoders", "--n-boot", "20", "--no-grids"]


def _run(toy_sets, out, *extra):
    E.main(["--images", str(toy_sets[0]), "--reference", str(toy_sets[1]), "--out", str(out), *BASE, *extra])
    return json.loads((out / "summary.json").read_text()), list(csv.DictReader(open(out / "results.csv", newline="")))


def _preds(rows, label, column, classes):
    """Class indices of `column` (class names, "" = no face) for the rows of set `label`, in file order."""
    return [classes.index(r[column]) if r[column] else -1 for r in rows if r["set"] == label]


def _brute_bias(pred, k):
    f = np.bincount([p for p in pred if p >= 0], minlength=k) / sum(p >= 0 for p in pred)
    pairs = list(itertools.combinations(range(k), 2))
    return sum(abs(f[x] - f[y]) for x, y in pairs) / len(pairs)


def test_same_judge_twice_agrees_completely(toy_sets, tmp_path):
    report, rows = _run(toy_sets, tmp_path / "eval", "--judge2", "toy")
    assert report["settings"]["judge2"] == "toy"
    for label in ("debiased", "original"):
        for a, classes in C.load_classifier("toy").attributes.items():
            e = report["agreement"][label][a]
            # every rendered person is judged (2 x 6), the two noise images by neither; the classes vary, so p_e < 1
            assert e["n_compared"] == 2 * PER_PROMPT
            assert e["share"] == 1.0 and e["kappa"] == 1.0
            assert e["judge1"] == e["judge2"] == report["summaries"][label]["mean"][e["metric"]]
            assert _preds(rows, label, f"{a}_pred", classes) == _preds(rows, label, f"judge2_{a}_pred", classes)
    md = (tmp_path / "eval" / "summary.md").read_text()
    assert "## Judge agreement: judge 1 `toy`, judge 2 `toy`" in md
    assert "| gender | debiased | gender_bias |" in md and "| 1.000 | 1.000 | 12 |" in md


class _ResizeTo(torch.nn.Module):
    """Bilinear (antialiased) resize to `size` before `net`: lets a 32 px network read crops of another size."""

    def __init__(self, net, size=32):
        super().__init__()
        self.net, self.size = net, size

    def forward(self, x):
        x = torch.nn.functional.interpolate(x, size=(self.size,) * 2, mode="bilinear", align_corners=False,
                                            antialias=x.shape[-1] > self.size)
        return self.net(x)


def _other_judge(path=None, **kw):
    """A second judge that disagrees with the toy one now and then: the toy network with noise (5 x the weights'
    std, seed 0) on its output layer, gender and race heads only (no age), reading 48 px crops (judge 1: 32 px)."""
    from common.toy.nets import HEADS

    net = copy.deepcopy(C.load_classifier("toy").nets[0])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        net.out.weight += 5 * net.out.weight.std() * torch.randn(net.out.weight.shape, generator=g)
    return C.AttributeClassifier(_ResizeTo(net), HEADS[:2], input_size=48, name="other-judge")


def test_another_judge_reports_what_its_per_image_predictions_give(toy_sets, tmp_path, monkeypatch):
    monkeypatch.setitem(C.CLASSIFIERS, "test-other-judge", _other_judge)
    out = tmp_path / "eval"
    report, rows = _run(toy_sets, out, "--judge2", "test-other-judge", "--device", "cpu")
    classes = C.load_classifier("toy").attributes
    other = _other_judge()
    nontrivial = 0
    for label in ("debiased", "original"):
        mine = [r for r in rows if r["set"] == label]
        # oracle 1: the second judge by hand on the same face crop, which for the toy detector (box = the whole 32 px
        # image, no expansion) is the image resized to the judge's 48 px input; all -1 where no face was found
        x = torch.stack([torch.from_numpy(np.array(Image.open(r["file"]).convert("RGB"))).permute(2, 0, 1)
                         for r in mine]).float() / 127.5 - 1
        x48 = torch.nn.functional.interpolate(x, size=(48, 48), mode="bilinear", align_corners=False)
        x48[torch.tensor([r["face_found"] == "0" for r in mine])] = -1
        with torch.no_grad():
            want = {a: v.softmax(-1) for a, v in other(x48).items()}
        for a in ("gender", "race"):
            got = torch.tensor([[float(r[f"judge2_{a}_p_{c}"]) for c in classes[a]] for r in mine])
            torch.testing.assert_close(got, want[a], atol=1e-4, rtol=0)  # csv rounds to 6 decimals; fp32 resize
            pa = _preds(rows, label, f"{a}_pred", classes[a])
            pb = _preds(rows, label, f"judge2_{a}_pred", classes[a])
            assert [p >= 0 for p in pa] == [p >= 0 for p in pb] == [r["face_found"] == "1" for r in mine]
            e = report["agreement"][label][a]
            # oracle 2: agreement recomputed from the per-image predictions, by `agreement` and by a confusion matrix
            assert (e["share"], e["kappa"]) == pytest.approx(agreement(torch.tensor(pa), torch.tensor(pb),
                                                                       len(classes[a])), abs=1e-15)
            assert (e["share"], e["kappa"]) == pytest.approx(_kappa_from_confusion(pa, pb, len(classes[a])), abs=1e-12)
            assert e["n_compared"] == 2 * PER_PROMPT
            # oracle 3: judge 2's bias, the mean over the two prompts of the brute-force pairwise gap of its classes
            k = len(classes[a])
            per_prompt = [_brute_bias(pb[i * (PER_PROMPT + 1): (i + 1) * (PER_PROMPT + 1)], k) for i in range(2)]
            assert e["judge2"] == pytest.approx(np.mean(per_prompt), abs=1e-12)
            assert e["judge1"] == report["summaries"][label]["mean"][f"{a}_bias"]
            nontrivial += 0 < e["share"] < 1 and 0 < abs(e["kappa"]) < 1
        # age: only judge 1 reads it, so it is reported for judge 1 alone
        age = report["agreement"][label]["age"]
        assert age["judge1"] is not None and age["judge2"] is None and age["share"] is None and age["n_compared"] == 0
    assert nontrivial >= 2  # the seeded noise makes the judges disagree on some images: a real test of the kappa
    assert report["judge2"]["name"] == "test-other-judge"
    assert [a["name"] for a in report["judge2"]["attributes"]] == ["gender", "race"]
    md = (out / "summary.md").read_text()
    e = report["agreement"]["original"]["race"]
    assert f"| race | original | race_bias | {E._fmt_entry(e, 'judge1')} | {E._fmt_entry(e, 'judge2')} | " \
           f"{e['share']:.3f} | {e['kappa']:.3f} | 12 |" in md
    assert "| age | debiased | age_gap |" in md and "| - | - | - | - |" in md  # age's preset target is 75/25: a gap


def test_unknown_second_judge_is_one_sentence_and_exit_2(toy_sets, tmp_path, capsys):
    out = tmp_path / "eval"
    with pytest.raises(SystemExit) as e:
        cli(E.main, ["--images", str(toy_sets[0]), "--out", str(out), *BASE, "--judge2", "no-such-judge",
                     "--device", "cpu"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown classifier 'no-such-judge'; registered: [") and "\n" not in err
    assert not (out / "results.csv").exists()  # refused before any image was judged


def test_judges_reading_one_attribute_with_other_classes_are_refused(toy_sets, tmp_path, monkeypatch, capsys):
    def swapped(path=None, **kw):  # gender with its classes in the other order: indices mean other things
        return C.AttributeClassifier(C.load_classifier("toy").nets[0], [C.Head("gender", ("male", "female"), (1, 0))],
                                     input_size=32)

    monkeypatch.setitem(C.CLASSIFIERS, "test-swapped", swapped)
    with pytest.raises(SystemExit) as e:
        cli(E.main, ["--images", str(toy_sets[0]), "--out", str(tmp_path / "eval"), *BASE, "--judge2", "test-swapped",
                     "--device", "cpu"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == (
        "error: the two judges read attribute 'gender' with different classes (['female', 'male'] and ['male', "
        "'female']); pick a second judge with the first one's classes for it")


def test_experiment_script_passes_the_configs_second_judge(toy_sets, tmp_path, repo_root):
    """scripts/experiment.sh evaluate: judges.agreement set in the config -> common.evaluate runs with --judge2."""
    import shutil

    exp = tmp_path / "exp"
    (exp / "configs").mkdir(parents=True)
    out = tmp_path / "run"
    (exp / "configs" / "toy.yaml").write_text(
        f"extends: [{repo_root / 'exp-3-debias-gender-race' / 'configs' / 'toy.yaml'}]\n"
        f"judges: {{agreement: toy}}\npaths: {{output_dir: {out}}}\n")
    for label, src in zip(("debiased", "original"), toy_sets):
        shutil.copytree(src, out / "images" / label)
    env = dict(os.environ, PYTHONPATH=str(repo_root))
    r = subprocess.run(["bash", str(repo_root / "scripts" / "experiment.sh"), "evaluate", str(exp), "toy",
                        "--n-boot", "0", "--no-grids"], env=env, capture_output=True, text=True, cwd=repo_root)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads((out / "eval" / "summary.json").read_text())
    assert report["settings"]["judge2"] == "toy" and report["settings"]["classifier"] == "toy"
    assert report["agreement"]["debiased"]["gender"]["kappa"] == 1.0


def test_reproduce_table_gains_the_agreement_columns(tmp_path):
    """common.reproduce --judge2 on tiny components: its table ends with the agreement section, whose numbers are
    those of the per-image predictions in its evaluation's results.csv."""
    from common import adapters as ad
    from common import reproduce as R
    from common.models import tiny_components

    c = tiny_components(seed=0)
    ad.add_lora(c, text_encoder=True, unet=False, rank=2)
    ad.save_lora(c, tmp_path / "lora")
    # judge 1 reads 64 px crops, judge 2 the same random network's 224 px crops
    res = R.main(["--experiment", "exp-4", "--lora", str(tmp_path / "lora"), "--model", "tiny", "--image-size", "32",
                  "--steps", "2", "--limit-prompts", "2", "--images-per-prompt", "2", "--classifier",
                  "random-fairface8", "--classifier-input-size", "64", "--judge2", "random-fairface8",
                  "--detector", "whole-image", "--clip-model", "", "--image-encoders", "--n-boot", "0",
                  "--out", str(tmp_path / "rep")])
    table, agree = res["table"], res["report"]["agreement"]
    assert "## Judge agreement: judge 1 `random-fairface8`, judge 2 `random-fairface8`" in table
    assert (tmp_path / "rep" / "reproduce.md").read_text() == table
    rows = list(csv.DictReader(open(tmp_path / "rep" / "eval" / "results.csv", newline="")))
    classes = C.load_classifier("random-fairface8").attributes
    for label in ("debiased", "original"):
        for a, names in classes.items():
            e = agree[label][a]
            pa, pb = _preds(rows, label, f"{a}_pred", names), _preds(rows, label, f"judge2_{a}_pred", names)
            assert e["n_compared"] == 4
            assert (e["share"], e["kappa"]) == pytest.approx(_kappa_from_confusion(pa, pb, len(names)), abs=1e-12,
                                                             nan_ok=True)
            assert f"| {a} | {label} | {e['metric']} |" in table
    # exp-4's 75/25 age target applies to both judges' age: a gap, not a bias
    assert agree["debiased"]["age"]["metric"] == "age_gap"


def test_demo_reports_the_second_judge_per_split(toy_sets, tmp_path, monkeypatch):
    """`make demo` with --judge2: its summary entries and table rows are the evaluation's agreement report, original
    images before and debiased after (here one evaluation stands for both splits)."""
    from common.toy.demo import second_judge_summary

    monkeypatch.setitem(C.CLASSIFIERS, "test-other-judge", _other_judge)
    report = E.evaluate(toy_sets[0], tmp_path / "eval", classifier="toy", detector="toy", reference_dir=toy_sets[1],
                        image_encoders=(), n_boot=0, grids=False, progress=False, judge2="test-other-judge")
    summary, rows = second_judge_summary({"train": report, "heldout": report}, "test-other-judge")
    ag = report["agreement"]
    for prefix in ("train_", ""):
        for a in ("gender", "race"):
            for when, label in (("before", "original"), ("after", "debiased")):
                assert summary[f"{prefix}{a}_agreement_{when}"] == ag[label][a]["share"]
                assert summary[f"{prefix}{a}_kappa_{when}"] == ag[label][a]["kappa"]
                assert summary[f"{prefix}judge2_{a}_bias_{when}"] == ag[label][a]["judge2"]
    assert not any("age" in k for k in summary)  # judge 2 does not read age: nothing to compare
    assert len(summary) == 2 * 2 * 3 * 2 and len(rows) == 2 * 2 * 2
    g = ag["debiased"]["gender"], ag["original"]["gender"]
    assert (f"| heldout | gender agreement with judge 2 (kappa) | {g[1]['share']:.3f} ({g[1]['kappa']:.3f}) | "
            f"{g[0]['share']:.3f} ({g[0]['kappa']:.3f}) |") in rows
