"""Distributional alignment against independent oracles: brute force over labelings and permutations, POT's ot.emd,
hand-derived binomial tails (the N = 24 example of docs/method.md#expected-targets), and a 2-process gloo run against
the 1-process union."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from common.alignment import alignment_loss, assign, expected_targets, joint_cost


def _probs(seed: int, n: int, sizes: dict[str, int], scale: float = 2.0) -> dict[str, torch.Tensor]:
    """Random continuous class probabilities [n, K] in float64 (no ties, so the optimal assignment is unique)."""
    g = torch.Generator().manual_seed(seed)
    return {a: torch.softmax(scale * torch.randn(n, k, generator=g, dtype=torch.float64), 1) for a, k in sizes.items()}


def _brute_force(probs: dict[str, torch.Tensor], dists: dict[str, list[float]], asym: bool = False):
    """q per attribute by brute force: every labeling u_1..u_N of the joint space with its probability, and for each
    the cheapest of all N! assignments; costs written element by element from the formula (docs/method.md#joint-attributes)."""
    names = list(probs)
    p = {a: probs[a].tolist() for a in names}
    sizes = [len(dists[a]) for a in names]
    cells = list(itertools.product(*[range(k) for k in sizes]))
    w = [math.prod(dists[a][c] for a, c in zip(names, cell)) for cell in cells]
    n = len(p[names[0]])
    cost = np.zeros((n, len(cells)))
    for i in range(n):
        for j, cell in enumerate(cells):
            s = 0.0
            for a, c in zip(names, cell):
                for k, pk in enumerate(p[a][i]):
                    dev = pk - (1.0 if k == c else 0.0)
                    if asym and a == "age" and c == 1 and k == 0:
                        dev = 2 * dev  # authors' exp-4: young deviation doubled for an old target
                    s += dev * dev
            cost[i, j] = math.sqrt(s)
    perms = np.array(list(itertools.permutations(range(n))))
    rows = np.arange(n)
    q = np.zeros((n, len(cells)))
    for lab in itertools.product(range(len(cells)), repeat=n):
        prob = math.prod(w[u] for u in lab)
        if prob == 0:
            continue
        lab = np.array(lab)
        best = perms[np.argmin(cost[rows, lab[perms]].sum(1))]  # image i receives target lab[best[i]]
        q[rows, lab[best]] += prob
    return {a: np.stack([q[:, [j for j, c in enumerate(cells) if c[ai] == k]].sum(1) for k in range(sizes[ai])], 1)
            for ai, a in enumerate(names)}


ORACLE_CASES = [
    # (sizes, dists, N, asym)
    ({"gender": 2}, {"gender": [0.5, 0.5]}, 6, False),
    ({"race": 4}, {"race": [0.25] * 4}, 6, False),
    ({"gender": 2, "race": 4}, {"gender": [0.5, 0.5], "race": [0.25] * 4}, 5, False),
    ({"race": 4}, {"race": [0.4, 0.3, 0.2, 0.1]}, 5, False),
    ({"gender": 2, "age": 2}, {"gender": [0.5, 0.5], "age": [0.75, 0.25]}, 6, False),
    ({"gender": 2, "age": 2}, {"gender": [0.5, 0.5], "age": [0.75, 0.25]}, 5, True),
    ({"gender": 2, "race": 4, "age": 2}, {"gender": [0.5, 0.5], "race": [0.25] * 4, "age": [0.75, 0.25]}, 3, True),
]


@pytest.mark.parametrize("sizes,dists,n,asym", ORACLE_CASES)
def test_exact_equals_brute_force(sizes, dists, n, asym):
    probs = _probs(len(sizes) * 10 + n, n, sizes)
    want = _brute_force(probs, dists, asym)
    got = expected_targets(probs, dists, method="exact", age_asymmetric=asym)
    for a in sizes:
        # both are exact in float64; 1e-9 leaves room for summation-order rounding over <= 32768 terms
        np.testing.assert_allclose(got[a].numpy(), want[a], atol=1e-9, rtol=0)
        assert got[a].dtype == torch.float64


def test_binary_and_auto_equal_brute_force():
    probs = _probs(1, 6, {"gender": 2})
    want = _brute_force(probs, {"gender": [0.3, 0.7]})
    for method in ("binary", "auto"):
        got = expected_targets(probs, {"gender": [0.3, 0.7]}, method=method)["gender"].numpy()
        np.testing.assert_allclose(got, want["gender"], atol=1e-9, rtol=0)  # closed form vs exact sums in float64


@pytest.mark.parametrize("ratio", [[0.5, 0.5], [0.75, 0.25], [0.25, 0.75]])
@pytest.mark.parametrize("n", [1, 2, 7, 24, 40])
def test_binary_equals_exact(n, ratio):
    probs = _probs(n, n, {"age": 2})
    b = expected_targets(probs, {"age": ratio}, method="binary")["age"]
    e = expected_targets(probs, {"age": ratio}, method="exact")["age"]
    torch.testing.assert_close(b, e, atol=1e-10, rtol=0)  # binomial tails vs 41 summed plans, float64 rounding


def test_binary_with_degenerate_joint_support_equals_exact():
    """gender x race with the race target all on one class has two joint classes: binary applies and is exact."""
    probs = _probs(5, 9, {"gender": 2, "race": 4})
    dists = {"gender": [0.5, 0.5], "race": [0.0, 1.0, 0.0, 0.0]}
    b = expected_targets(probs, dists, method="binary")
    e = expected_targets(probs, dists, method="exact")
    for a in dists:
        torch.testing.assert_close(b[a], e[a], atol=1e-10, rtol=0)
    # the race marginal sums the two binomial tails: 1 up to float64 rounding
    torch.testing.assert_close(b["race"], torch.tensor([0.0, 1.0, 0.0, 0.0], dtype=torch.float64).expand(9, 4))


def test_worked_example_n24():
    """docs/method.md#expected-targets: N = 24, ratio 0.5, C = 0.8 -> ranks 0-9 female, 14-23 male, 10-13 no target (20 of 24)."""
    probs = _probs(7, 24, {"gender": 2})
    q = expected_targets(probs, {"gender": [0.5, 0.5]})["gender"]
    target, conf = assign(q, 0.8)
    rank = probs["gender"][:, 1].argsort().argsort()
    assert int((target >= 0).sum()) == 20
    assert (target[rank <= 9] == 0).all() and (target[rank >= 14] == 1).all()
    assert (target[(rank >= 10) & (rank <= 13)] == -1).all()
    # hand-derived: the face of rank k is female iff fewer than 24 - k males are drawn: P(Bin(24, 1/2) <= 23 - k)
    for i in range(24):
        k = int(rank[i])
        p_female = sum(math.comb(24, j) for j in range(24 - k)) / 2**24
        assert math.isclose(float(q[i, 0]), p_female, abs_tol=1e-12)
    assert math.isclose(1 - float(conf[rank == 9]), sum(math.comb(24, j) for j in range(10)) / 2**24, abs_tol=1e-12)
    assert 1 - float(conf[rank == 9]) <= 0.154


def test_monte_carlo_converges_to_exact():
    probs = _probs(11, 16, {"race": 4})
    d = {"race": [0.25] * 4}
    e = expected_targets(probs, d, method="exact")["race"]  # 969 count vectors
    m = expected_targets(probs, d, method="monte_carlo", samples=2000, seed=0)["race"]
    # standard error <= sqrt(0.25 / 2000) = 0.011; 0.05 is > 4 standard errors
    assert (m - e).abs().max() < 0.05
    probs = _probs(12, 8, {"gender": 2, "race": 4})
    d = {"gender": [0.5, 0.5], "race": [0.25] * 4}
    e = expected_targets(probs, d, method="exact")  # 6435 count vectors, beyond auto's limit but allowed explicitly
    m = expected_targets(probs, d, samples=2000, seed=1)  # auto -> monte_carlo here
    for a in d:
        assert (m[a] - e[a]).abs().max() < 0.05


def test_monte_carlo_seeded():
    probs = _probs(3, 10, {"gender": 2, "race": 4})
    d = {"gender": [0.5, 0.5], "race": [0.25] * 4}
    a = expected_targets(probs, d, method="monte_carlo", seed=5)
    b = expected_targets(probs, d, method="monte_carlo", seed=5)
    c = expected_targets(probs, d, method="monte_carlo", seed=6)
    assert all(torch.equal(a[k], b[k]) for k in d) and not torch.equal(a["race"], c["race"])
    # each face row is a distribution over classes whose entries are multiples of 1/samples
    assert torch.allclose(a["race"].sum(1), torch.ones(10, dtype=torch.float64))
    assert torch.allclose(a["race"] * 100, (a["race"] * 100).round(), atol=1e-9)


@pytest.mark.parametrize("sizes,n", [({"race": 4}, 6), ({"gender": 2, "race": 4}, 10)])
def test_monte_carlo_equals_pot_on_the_same_draws(sizes, n):
    """Same count vectors (the documented seeding: numpy default_rng(seed).multinomial), each solved by POT's ot.emd
    one sample at a time and averaged: equals our deduplicated assignment-solver result."""
    import ot

    probs = _probs(13, n, sizes)
    dists = {a: [1 / k] * k for a, k in sizes.items()}
    k = math.prod(sizes.values())
    draws = np.random.default_rng(7).multinomial(n, [1 / k] * k, size=100)
    if n == 6:  # 84 possible count vectors: repeats exercise the deduplication
        assert len({tuple(b) for b in draws}) < 50
    m = joint_cost(probs).numpy()
    plan = sum(ot.emd(np.ones(n), b.astype(float), m) for b in draws) / 100
    got = expected_targets(probs, dists, method="monte_carlo", samples=100, seed=7)
    cells = list(itertools.product(*[range(s) for s in sizes.values()]))
    for ai, (a, size) in enumerate(sizes.items()):
        want = np.stack([plan[:, [j for j, c in enumerate(cells) if c[ai] == cl]].sum(1) for cl in range(size)], 1)
        np.testing.assert_allclose(got[a].numpy(), want, atol=1e-12, rtol=0)  # same 0/1 plans; rounding only


def test_auto_choice():
    """auto = binary for 2 classes, exact up to 5000 count vectors (race, N = 12: 455), else Monte Carlo."""
    p = _probs(14, 12, {"race": 4})
    d = {"race": [0.25] * 4}
    assert torch.equal(expected_targets(p, d)["race"], expected_targets(p, d, method="exact")["race"])
    p = _probs(15, 12, {"gender": 2, "race": 4})  # C(19, 7) = 50388 count vectors
    d = {"gender": [0.5, 0.5], "race": [0.25] * 4}
    assert torch.equal(expected_targets(p, d, seed=4)["race"], expected_targets(p, d, method="monte_carlo", seed=4)["race"])


def test_mass_truncation_matches_pot_reference():
    """Authors' exp-6: most probable count vectors until cumulative mass > 0.95, each solved by POT's ot.emd,
    plans averaged with the kept weights (row-normalised). Written here from that description with exact fractions."""
    import ot  # here, not at the top: keeps the spawned processes of the 2-process test light (POT imports in ~1 s)

    n = 8
    probs = _probs(21, n, {"race": 4})
    comps = [b for b in itertools.product(range(n + 1), repeat=4) if sum(b) == n]
    weight = [Fraction(math.factorial(n), math.prod(math.factorial(x) for x in b)) / 4**n for b in comps]
    order = sorted(range(len(comps)), key=lambda i: -weight[i])
    kept, cum = [], Fraction(0)
    for i in order:
        kept.append(i)
        cum += weight[i]
        if cum > Fraction(95, 100):
            break
    assert len(kept) < len(comps)
    m = np.array([[np.linalg.norm(p - np.eye(4)[j]) for j in range(4)] for p in probs["race"].numpy()])
    plan = sum(float(weight[i]) * ot.emd(np.ones(n), np.array(comps[i], dtype=float), m) for i in kept)
    want = plan / plan.sum(1, keepdims=True)
    got = expected_targets(probs, {"race": [0.25] * 4}, method="exact", mass=0.95)["race"].numpy()
    np.testing.assert_allclose(got, want, atol=1e-9, rtol=0)  # both exact; float64 summation differences only
    full = expected_targets(probs, {"race": [0.25] * 4}, mass=None)["race"].numpy()
    assert np.abs(full - got).max() > 1e-4  # the truncation changes the answer


def test_no_face_rows():
    probs = _probs(4, 7, {"gender": 2, "race": 4})
    d = {"gender": [0.5, 0.5], "race": [0.25] * 4}
    holes = [0, 3, 4, 9]
    full = {a: torch.full((11, p.shape[1]), -1.0, dtype=torch.float64) for a, p in probs.items()}
    face_idx = [i for i in range(11) if i not in holes]
    for a in probs:
        full[a][face_idx] = probs[a]
    got = expected_targets(full, d, method="exact")
    want = expected_targets(probs, d, method="exact")  # the face-only batch: N = 7
    for a in d:
        torch.testing.assert_close(got[a][face_idx], want[a], atol=0, rtol=0)
        assert (got[a][holes] == -1).all()
    target, conf = assign(got["race"], 0.8)
    assert (target[holes] == -1).all() and (conf[holes] == -1).all()
    none = {a: torch.full((3, p.shape[1]), -1.0) for a, p in probs.items()}
    out = expected_targets(none, d)
    assert all((out[a] == -1).all() and out[a].dtype == torch.float32 for a in d)


def test_joint_cost_formula():
    """The joint cost (docs/method.md#joint-attributes) by hand for one face: cells 8 g + 2 r + a, plain and
    asymmetric age term."""
    probs = _probs(2, 3, {"gender": 2, "race": 4, "age": 2})
    c, ca = joint_cost(probs), joint_cost(probs, age_asymmetric=True)
    pg, pr, pa = (probs[k][1].tolist() for k in ("gender", "race", "age"))
    for g, r, a in itertools.product(range(2), range(4), range(2)):
        dg = sum((pg[k] - (k == g)) ** 2 for k in range(2))
        dr = sum((pr[k] - (k == r)) ** 2 for k in range(4))
        da = (pa[0] - 1) ** 2 + pa[1] ** 2 if a == 0 else pa[0] ** 2 + (pa[1] - 1) ** 2
        da_asym = da if a == 0 else (2 * pa[0]) ** 2 + (pa[1] - 1) ** 2
        assert math.isclose(float(c[1, 8 * g + 2 * r + a]), math.sqrt(dg + dr + da), rel_tol=1e-12)
        assert math.isclose(float(ca[1, 8 * g + 2 * r + a]), math.sqrt(dg + dr + da_asym), rel_tol=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_asymmetric_age_cost_direction(seed):
    """The doubled young deviation makes 'old' costlier for young-looking faces: the old targets move to faces that
    look older (the mean p_young of the faces targeted 'old' goes down), and the total old mass stays N * 0.25."""
    probs = _probs(seed, 12, {"gender": 2, "age": 2})
    d = {"gender": [0.5, 0.5], "age": [0.75, 0.25]}
    sym = expected_targets(probs, d, method="exact")["age"]
    asym = expected_targets(probs, d, method="exact", age_asymmetric=True)["age"]
    young = probs["age"][:, 0]
    mean_young = lambda q: float((q[:, 1] * young).sum() / q[:, 1].sum())
    assert mean_young(asym) < mean_young(sym)
    assert math.isclose(float(asym[:, 1].sum()), 3.0, rel_tol=1e-9) and math.isclose(float(sym[:, 1].sum()), 3.0, rel_tol=1e-9)


def test_assign_threshold_boundary():
    """Keep iff confidence >= C; equals the authors' 'drop iff 1 - c > 0.2' on the float64 and float32 values around
    0.8 (every neighbour within 40 ulp), computed here in each dtype as they would."""
    for dtype in (torch.float64, torch.float32):
        c = torch.tensor([0.8], dtype=dtype)
        for direction in (0.0, 1.0):
            x = torch.tensor([0.8], dtype=dtype)
            for _ in range(40):
                x = torch.nextafter(x, torch.tensor([direction], dtype=dtype))
                c = torch.cat([c, x])
        c = torch.cat([c, torch.tensor([0.5, 1.0, 0.79, 0.81], dtype=dtype)])
        q = torch.stack([c, 1 - c], 1)
        target, conf = assign(q, 0.8)
        authors = torch.where(1 - c > torch.tensor(0.2, dtype=dtype), -1, 0)
        assert torch.equal(target, authors) and int((target == 0).sum()) == 43  # 0.8, 40 above, 1.0, 0.81
        assert torch.equal(conf, c)
    assert assign(torch.tensor([[0.2, 0.8]]), 0.8)[0].tolist() == [1]


def test_monte_carlo_frequencies_exact():
    """Monte Carlo q is k / samples correctly rounded (marginals taken on the integer counts), so a face that gets a
    class in exactly 80 of 100 samples has confidence fl(0.8) and is kept at C = 0.8."""
    probs = _probs(9, 10, {"gender": 2, "race": 4})
    q = expected_targets(probs, {"gender": [0.5, 0.5], "race": [0.25] * 4}, method="monte_carlo", samples=100)
    for a in q:
        assert torch.equal(q[a], (q[a] * 100).round() / 100)


def test_alignment_loss():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 4, generator=g, requires_grad=True)
    targets = torch.tensor([2, -1, 0, 3, -1])
    loss = alignment_loss(logits, targets)
    ref = logits.detach()
    for i, t in enumerate(targets.tolist()):
        want = 0.0 if t < 0 else float(torch.logsumexp(ref[i], 0) - ref[i, t])  # CE by hand
        assert math.isclose(float(loss[i].detach()), want, abs_tol=1e-6)  # float32 CE
    loss.sum().backward()
    assert (logits.grad[[1, 4]] == 0).all() and (logits.grad[[0, 2, 3]] != 0).any()
    with pytest.raises(ValueError, match="targets must be -1 or in"):
        alignment_loss(logits, torch.tensor([4, 0, 0, 0, 0]))


def test_bad_input():
    p = _probs(0, 4, {"gender": 2, "race": 4})
    d = {"gender": [0.5, 0.5], "race": [0.25] * 4}
    with pytest.raises(ValueError, match=r"dists\['race'\] = .* has 3 entries but probs\['race'\] has 4 classes"):
        expected_targets(p, {"gender": [0.5, 0.5], "race": [0.3, 0.3, 0.4]})
    with pytest.raises(ValueError, match=r"dists\['gender'\] = \[0.6, 0.6\] must be .* summing to 1"):
        expected_targets(p, {"gender": [0.6, 0.6], "race": [0.25] * 4})
    with pytest.raises(ValueError, match=r"probs\['race'\] has 3 rows but others have 4"):
        expected_targets({"gender": p["gender"], "race": p["race"][:3]}, d)
    with pytest.raises(ValueError, match="probs has attributes .* but dists has"):
        expected_targets(p, {"gender": [0.5, 0.5]})
    with pytest.raises(ValueError, match="unknown alignment method 'sinkhorn'"):
        expected_targets(p, d, method="sinkhorn")
    with pytest.raises(ValueError, match="method='binary' needs 2 joint classes"):
        expected_targets(p, d, method="binary")
    with pytest.raises(ValueError, match="age_asymmetric needs an attribute 'age'"):
        expected_targets(p, d, age_asymmetric=True)
    with pytest.raises(ValueError, match="truncates exact enumeration only"):
        expected_targets(p, d, method="monte_carlo", mass=0.95)
    with pytest.raises(ValueError, match="use method='monte_carlo'"):
        expected_targets(_probs(0, 40, {"gender": 2, "race": 4}), d, method="exact")
    half = {"gender": p["gender"].clone(), "race": p["race"]}
    half["gender"][1] = -1
    with pytest.raises(ValueError, match=r"rows \[1\] are 'no face' \(all -1\) in some attributes only \(row 1: in \['gender'\]"):
        expected_targets(half, d)


def _dist_worker(rank: int, world: int, init_file: str, probs, dists, out: str):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        group = torch.distributed.group.WORLD
        mc = expected_targets(probs, dists, method="monte_carlo", samples=100, seed=3, group=group)
        ex = expected_targets(probs, dists, method="exact", group=group)
        torch.save({"mc": mc, "exact": ex}, f"{out}/rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_two_processes_equal_union_of_samples(tmp_path):
    """2 gloo processes x 100 samples (seeds 3 and 1003) == 1 process averaging the same 200 samples."""
    probs = _probs(8, 10, {"gender": 2, "race": 4})
    dists = {"gender": [0.5, 0.5], "race": [0.25] * 4}
    mp.spawn(_dist_worker, args=(2, str(tmp_path / "init"), probs, dists, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    s0 = expected_targets(probs, dists, method="monte_carlo", samples=100, seed=3)
    s1 = expected_targets(probs, dists, method="monte_carlo", samples=100, seed=1003)
    ex = expected_targets(probs, dists, method="exact")
    for a in dists:
        assert torch.equal(r0["mc"][a], r1["mc"][a])
        # each q is (sum of its plans) / 100, so the union of the 200 samples is their mean; float64 rounding only
        torch.testing.assert_close(r0["mc"][a], (s0[a] + s1[a]) / 2, atol=1e-12, rtol=0)
        assert not torch.equal(r0["mc"][a], s0[a])
        assert torch.equal(r0["exact"][a], ex[a]) and torch.equal(r1["exact"][a], ex[a])
