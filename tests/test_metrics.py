"""Metric oracles: hand-derived values from the paper's definitions, brute-force pair enumeration, bootstrap coverage
on synthetic data with known frequencies, and CLIP-T against transformers' own CLIPModel forward."""

import itertools
import math

import numpy as np
import pytest
import torch

from common import metrics as M
from common.attributes import preset


def _pred(counts: dict[int, int]) -> torch.Tensor:
    """A prediction vector with `counts[c]` images of class c (c = -1: no face), shuffled."""
    v = torch.tensor([c for c, n in counts.items() for _ in range(n)], dtype=torch.long)
    return v[torch.randperm(v.numel())]


def _brute_bias(freq):
    pairs = list(itertools.combinations(range(len(freq)), 2))
    return sum(abs(freq[i] - freq[j]) for i, j in pairs) / len(pairs)


def test_bias_oracles_from_the_issue():
    # 45 male / 15 female: |0.75 - 0.25| = 0.5 (gender bias is |f_male - f_female|)
    assert M.bias(_pred({1: 45, 0: 15}), 2) == pytest.approx(0.5, abs=1e-12)
    # race frequencies (0.4, 0.3, 0.2, 0.1): pairs 0.1,0.2,0.3,0.1,0.2,0.1 -> 1.0 / 6
    assert M.bias(_pred({0: 40, 1: 30, 2: 20, 3: 10}), 4) == pytest.approx(1 / 6, abs=1e-12)
    # images without a face are excluded from the frequencies
    assert M.bias(_pred({1: 45, 0: 15, -1: 40}), 2) == pytest.approx(0.5, abs=1e-12)
    assert M.bias(_pred({0: 40, 1: 30, 2: 20, 3: 10, -1: 7}), 4) == pytest.approx(1 / 6, abs=1e-12)


def test_bias_extremes_match_the_paper():
    # docs/method.md#metrics: gender 1 when all one gender, race max 0.5, gender x race max 0.25, 0 when balanced
    assert M.bias(_pred({0: 10}), 2) == 1.0
    assert M.bias(_pred({2: 10}), 4) == pytest.approx(0.5)
    assert M.bias(_pred({5: 10, -1: 3}), 8) == pytest.approx(0.25)
    assert M.bias(_pred({c: 5 for c in range(8)}), 8) == 0.0
    assert math.isnan(M.bias(_pred({-1: 4}), 2))


def test_bias_matches_brute_force_on_random_predictions():
    g = torch.Generator().manual_seed(3)
    for k in (2, 3, 4, 8):
        pred = torch.randint(-1, k, (97,), generator=g)
        faces = pred[pred >= 0].tolist()
        freq = [faces.count(c) / len(faces) for c in range(k)]
        assert M.bias(pred, k) == pytest.approx(_brute_bias(freq), abs=1e-12)


def test_joint_cells_follow_gender_times_four_plus_race():
    gender = torch.tensor([0, 1, 1, -1, 0])
    race = torch.tensor([3, 0, 2, 1, -1])
    cell = M.joint_pred([gender, race], [2, 4])
    assert cell.tolist() == [3, 4, 6, -1, -1]
    # 8-way oracle: 2 images in cell 4 (male, WMELH), 2 in cell 3 -> freqs 0.5 / 0.5 on two of 8 cells
    g = torch.tensor([1, 1, 0, 0])
    r = torch.tensor([0, 0, 3, 3])
    freq = [0.0] * 8
    freq[4] = freq[3] = 0.5
    assert M.bias(M.joint_pred([g, r], [2, 4]), 8) == pytest.approx(_brute_bias(freq))


def test_age_frequency_and_gaps():
    pred = _pred({0: 30, 1: 10, -1: 5})  # f_old = 0.25: on target
    a = M.age_metrics(pred)
    assert a == pytest.approx({"freq_old": 0.25, "old_gap": 0.0, "age_gap": 0.0})
    pred = _pred({0: 4, 1: 36})  # f_old = 0.9, f_young = 0.1
    a = M.age_metrics(pred)
    assert a["freq_old"] == pytest.approx(0.9)
    assert a["old_gap"] == pytest.approx(0.65)
    assert a["age_gap"] == pytest.approx((abs(0.1 - 0.75) + abs(0.9 - 0.25)) / 2)
    assert M.class_frequency(pred, 2, 1) == pytest.approx(0.9)
    assert M.target_gap(pred, (0.75, 0.25)) == pytest.approx(0.65)


def test_distance_to_target_names_and_computes_by_target():
    """A uniform target gets the paper's bias; a non-uniform one (age 75/25) the mean |f - target|, by hand: 30 young,
    10 old and 5 faceless images are ON a 75/25 target (gap 0) although their bias (|0.75 - 0.25|) is 0.5."""
    from common.attributes import PRESETS, Attribute

    on_target = _pred({0: 30, 1: 10, -1: 5})
    assert M.target_kind(PRESETS["gender"]) == "bias" and M.target_kind(PRESETS["age"]) == "gap"
    assert M.distance_to_target(on_target, PRESETS["gender"]) == ("bias", pytest.approx(0.5))
    assert M.distance_to_target(on_target, PRESETS["age"]) == ("gap", pytest.approx(0.0))
    balanced = _pred({0: 20, 1: 20})
    assert M.distance_to_target(balanced, PRESETS["age"]) == ("gap", pytest.approx((0.25 + 0.25) / 2))
    race = _pred({0: 6, 1: 2, 2: 2, 3: 0})  # uniform over 4: pairwise gaps 0.4, 0.4, 0.6, 0, 0.2, 0.2 -> mean 0.3
    assert M.distance_to_target(race, PRESETS["race"]) == ("bias", pytest.approx(0.3))
    skewed = Attribute("race", PRESETS["race"].classes, (0.4, 0.2, 0.2, 0.2))  # 0.6, 0.2, 0.2, 0 -> |.2|,0,0,|.2| / 4
    assert M.distance_to_target(race, skewed) == ("gap", pytest.approx(0.1))


def test_rates():
    found = torch.tensor([True, True, False, True])
    probs = torch.tensor([[0.9, 0.1], [0.3, 0.7], [0.5, 0.5], [0.19, 0.81]])
    assert M.face_rate(found) == 0.75
    # faces: max probs 0.9, 0.7, 0.81 -> one of three below 0.8
    assert M.low_confidence_rate(probs, found) == pytest.approx(1 / 3)
    assert M.predictions(probs, found).tolist() == [0, 1, -1, 1]


def test_bad_predictions_are_named():
    with pytest.raises(ValueError, match=r"expected -1 \(no face\) or a class in \[0, 1\]"):
        M.bias(torch.tensor([0, 2]), 2)
    with pytest.raises(ValueError, match="integer class indices"):
        M.bias(torch.tensor([0.0, 1.0]), 2)


def _coverage(trials, make_data, truth, num_classes, stat, resample, n_boot=400):
    rng = np.random.default_rng(1234)
    hits = 0
    for t in range(trials):
        preds = make_data(rng)
        lo, hi = M.bootstrap_ci(preds, num_classes, stat=stat, resample=resample, n_boot=n_boot, seed=t)
        hits += lo <= truth <= hi
    return hits / trials


def test_bootstrap_images_covers_known_frequencies():
    # 4 fixed prompts with known class probabilities (slot 0 = no face); estimand: mean over them of the true bias
    # (p_male away from 0.5, where |f_m - f_f| is smooth) and of the true freq(old).
    probs = np.array([[0.1, 0.2, 0.7], [0.0, 0.15, 0.85], [0.2, 0.24, 0.56], [0.05, 0.1, 0.85]])
    faces = probs[:, 1:] / probs[:, 1:].sum(1, keepdims=True)
    true_bias = float(np.mean(np.abs(faces[:, 1] - faces[:, 0])))
    true_freq = float(np.mean(faces[:, 1]))

    def make(rng):
        return [torch.from_numpy(rng.choice(3, size=80, p=p) - 1) for p in probs]

    # 200 trials: the binomial sd of a 95 % coverage estimate is 1.5 %, so [0.89, 0.99] is a > 3.5 sd band
    cov_bias = _coverage(200, make, true_bias, 2, "bias", "images")
    cov_freq = _coverage(200, make, true_freq, 2, "freq1", "images")
    assert 0.89 <= cov_bias <= 0.99, cov_bias
    assert 0.89 <= cov_freq <= 0.99, cov_freq


def test_bootstrap_both_covers_the_population_mean_over_prompts():
    # prompts drawn from a population: p_male ~ U(0.65, 0.95) -> population mean bias E|2p - 1| = 2 * 0.8 - 1 = 0.6
    def make(rng):
        ps = rng.uniform(0.65, 0.95, size=20)
        return [torch.from_numpy((rng.random(60) < p).astype(np.int64)) for p in ps]

    cov = _coverage(150, make, 0.6, 2, "bias", "both")
    assert 0.88 <= cov <= 0.995, cov
    # resampling images only ignores the prompt-to-prompt spread and must cover this estimand clearly less often
    cov_images = _coverage(150, make, 0.6, 2, "bias", "images")
    assert cov_images < cov


def test_summarize_hand_built_table():
    # prompt 0: 3 male 1 female (+1 no face); prompt 1: 2 male 2 female. Races all WMELH in prompt 0, spread in 1.
    prompt = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1, 1])
    found = torch.tensor([1, 1, 1, 1, 0, 1, 1, 1, 1]).bool()
    male = [1, 1, 1, 0, 1, 1, 0, 1, 0]
    gender = torch.tensor([[1.0 - m, float(m)] for m in male])
    gender[0] = torch.tensor([0.3, 0.7])  # a low-confidence male
    race_cls = [0, 0, 0, 0, 0, 0, 1, 2, 3]
    race = torch.nn.functional.one_hot(torch.tensor(race_cls), 4).float()
    age = torch.nn.functional.one_hot(torch.tensor([1, 0, 0, 0, 1, 1, 1, 0, 0]), 2).float()
    table = {"prompt": prompt, "found": found, "probs": {"gender": gender, "race": race, "age": age}}
    s = M.summarize(table, [preset("gender"), preset("race"), "age"], n_boot=200)
    pp = s["per_prompt"]
    assert pp["gender_bias"] == pytest.approx({0: 0.5, 1: 0.0})
    assert s["mean"]["gender_bias"] == pytest.approx(0.25)
    assert s["std"]["gender_bias"] == pytest.approx(np.std([0.5, 0.0], ddof=1))
    assert pp["race_bias"] == pytest.approx({0: 0.5, 1: 0.0})
    assert pp["gender_freq_male"] == pytest.approx({0: 0.75, 1: 0.5})
    assert pp["gender_low_conf"] == pytest.approx({0: 0.25, 1: 0.0})
    assert pp["face_rate"] == pytest.approx({0: 0.8, 1: 1.0})
    # prompt 1 gender x race cells: (m,W)=4, (f,B)=1, (m,I)=6, (f,A)=3 -> four cells at 1/4, four at 0
    assert pp["gender_race_bias"][1] == pytest.approx(_brute_bias([0, .25, 0, .25, .25, 0, .25, 0]))
    # age target (0.75, 0.25): prompt 0 faces ages 1,0,0,0 -> f_old 0.25, gap 0; prompt 1: 1,1,0,0 -> gap 0.25
    assert pp["age_gap"] == pytest.approx({0: 0.0, 1: 0.25})
    assert "gender_gap" not in pp  # uniform targets: the bias is the metric
    assert "age_bias" not in pp and "race_age_bias" not in pp  # age's 75/25 target: frequency and gap instead
    lo, hi = s["ci"]["gender_bias"]
    assert lo <= s["mean"]["gender_bias"] <= hi
    flat = M.flatten_summary(s, prefix="eval_")
    assert flat["eval_gender_bias"] == pytest.approx(0.25) and flat["eval_gender_bias_p0"] == pytest.approx(0.5)


def test_clip_score_matches_clipmodel_forward():
    from common.models import clip_tokenizer

    model = M.load_clip_model("tiny")
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    prompts = ["a photo of the face of a senator, a person", "a cat", "a chef in a white coat leans on a table"]
    got = M.clip_score(images, prompts, model, batch_size=2)
    # oracle: CLIPModel's own forward (normalised embeddings, logits = exp(logit_scale) * cos), CLIP normalisation
    # written out here; 32 px input needs no resize. fp32 throughout: tolerance 1e-5.
    tok = clip_tokenizer()(prompts, padding=True, return_tensors="pt")
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)  # OpenAI CLIP's published mean / std
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    with torch.no_grad():
        out = model(input_ids=tok.input_ids, attention_mask=tok.attention_mask, pixel_values=((images + 1) / 2 - mean) / std)
    want = out.logits_per_image.diag() / model.logit_scale.exp()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_paired_similarity_is_the_cosine_of_the_encodings():
    enc = lambda x: torch.nn.functional.normalize(x.flatten(1)[:, :5], dim=-1)  # noqa: E731
    a = torch.rand(4, 3, 8, 8) * 2 - 1
    b = a.clone()
    b[1] = -a[1]
    got = M.paired_similarity(a, b, enc, batch_size=3)
    fa, fb = a.flatten(1)[:, :5].numpy(), b.flatten(1)[:, :5].numpy()
    want = (fa * fb).sum(1) / np.linalg.norm(fa, axis=1) / np.linalg.norm(fb, axis=1)
    np.testing.assert_allclose(got.numpy(), want, atol=1e-6)
    assert got[0] == pytest.approx(1.0, abs=1e-6) and got[1] == pytest.approx(-1.0, abs=1e-6)


def test_bias_floor_matches_exact_sums():
    """Oracles: for 2 classes the bias of k female of n is |2k/n - 1| with binomial weights; for 4 classes an exact
    sum over every count vector with its multinomial probability (n = 12). Monte Carlo tolerance 0.004 (> 4 standard
    errors at 20000 draws)."""
    from math import comb, factorial

    from common.metrics import bias_floor

    n = 32
    exact2 = sum(comb(n, k) * 0.5**n * abs(2 * k / n - 1) for k in range(n + 1))
    assert bias_floor(n, [0.5, 0.5]) == pytest.approx(exact2, abs=0.004)
    n = 12
    exact4 = 0.0
    for a in range(n + 1):
        for b in range(n + 1 - a):
            for c in range(n + 1 - a - b):
                d = n - a - b - c
                p = factorial(n) / (factorial(a) * factorial(b) * factorial(c) * factorial(d)) * 0.25**n
                f = [x / n for x in (a, b, c, d)]
                exact4 += p * sum(abs(f[i] - f[j]) for i in range(4) for j in range(i + 1, 4)) / 6
    assert bias_floor(n, [0.25] * 4) == pytest.approx(exact4, abs=0.004)
    with pytest.raises(ValueError, match="probability vector"):
        bias_floor(8, [0.7, 0.7])
