"""Distributional alignment: expected optimal-transport targets, confidence threshold, and the per-image alignment loss.

For N faces with classifier probabilities p_i (one vector per attribute) and a target distribution D on the joint class
space (attributes independent, so D is the product of the per-attribute targets), the target of face i is
q_i = E[u_sigma*(i)], the expectation over u_1..u_N drawn iid from D of the one-hot target that the cost-minimising
assignment sigma* gives to face i (docs/method.md#expected-targets). The cost of giving joint class j to face i is
the plain Euclidean distance between the concatenated per-attribute probability vectors and the concatenated one-hot
vectors of j (docs/method.md#joint-attributes), optionally with the authors' asymmetric age term (same section).

Only the multiset of the draws matters, so q is an expectation over count vectors b (how many targets of each joint
class) under the multinomial law Mult(N, D); for each b the assignment is a transportation problem with integer masses
(1 per face, b_j per class). Three ways to take the expectation, one answer:

- ``binary``: two joint classes with positive target mass. OT gives class 1 to the M faces with the largest cost
  advantage C[i, 0] - C[i, 1], M ~ Bin(N, w_1), so the face of ascending rank k gets class 1 with probability
  P(M >= N - k), a binomial tail; exact for any target ratio and any cost.
- ``exact``: every count vector with its multinomial probability; ``mass`` keeps only the most probable ones up to
  that cumulative mass, as the authors' exp-6; the kept weights are normalised, which is what the authors'
  row normalisation does.
- ``monte_carlo``: ``samples`` count vectors drawn from Mult(N, D) over the classes with positive target mass, by
  ``numpy.random.default_rng(seed + 1000 * rank).multinomial``; identical count vectors are solved once and weighted
  by their multiplicity (the same answer, fewer solves: frequent for 2- or 4-class spaces).
- ``auto``: ``binary`` for two classes; ``exact`` when there are at most ``EXACT_LIMIT`` = 5000 count vectors (e.g. race
  alone up to N = 29); else ``monte_carlo``. With ``mass`` given, ``auto`` means ``exact``.

Solver. Each transportation problem is solved exactly as an assignment problem: the cost matrix with column j repeated
b_j times, solved by ``scipy.optimize.linear_sum_assignment``. This is exact because the transportation polytope with
integer margins has integral vertices, so an optimal vertex is a 0/1 plan, i.e. an assignment. We chose it over POT's
``ot.emd`` (network simplex on the N x K problem) because it is 3-10x faster per problem at these sizes (measured on
the 2-core dev machine with classifier-like costs: N = 24, 8 classes 10 us vs 81 us; N = 40, 16 classes 37 us vs
130 us), mostly POT's per-call overhead; the test suite checks both give the same q. When the optimum is not unique the
two may return different optimal plans (only when costs tie, e.g. identical faces). The solves dominate the run time
(scripts/bench_alignment.py); the cost matrix, the draws and the expanded matrices are built vectorised.

Multi-process use (``group``): pass the GATHERED global probabilities on every process. ``binary`` and ``exact`` are
deterministic, so every process computes the same q without communication. ``monte_carlo`` draws ``samples`` count
vectors on each process with seed ``seed + 1000 * rank`` and sums the plans with one ``all_reduce``, so 2 processes x
100 samples average 200 samples (as the authors). The global q [N, K_a] is returned; each process slices its own rows.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from scipy.special import bdtr, bdtrc, gammaln
from tqdm.auto import tqdm

from common.attributes import Attribute, joint_space, joint_target

METHODS = ("auto", "binary", "exact", "monte_carlo")
EXACT_LIMIT = 5000
"""``auto`` enumerates count vectors exactly when there are at most this many (else Monte Carlo)"""
EXACT_HARD_LIMIT = 2_000_000
"""``exact`` refuses to enumerate more count vectors than this (memory); use ``monte_carlo``"""
RANK_SEED_STRIDE = 1000
"""process r draws its Monte Carlo samples with seed ``seed + RANK_SEED_STRIDE * r``"""


def _as_numpy(probs: dict[str, torch.Tensor], dists: dict[str, Sequence[float]]) -> dict[str, np.ndarray]:
    """Validate shapes and targets; return {attribute: [N, K_a] float64 numpy} (one device transfer per attribute)."""
    if not isinstance(probs, dict) or not probs:
        raise ValueError("probs must be a non-empty dict {attribute: Tensor[N, K_a]}")
    if set(probs) != set(dists):
        raise ValueError(f"probs has attributes {list(probs)} but dists has {list(dists)}; expected the same names")
    out = {}
    n = None
    for name, p in probs.items():
        if not torch.is_tensor(p) or p.dim() != 2 or not p.is_floating_point():
            shape = tuple(p.shape) if torch.is_tensor(p) else type(p).__name__
            raise ValueError(f"probs['{name}'] is {shape}; expected a float Tensor[N, K] of class probabilities")
        if n is None:
            n = p.shape[0]
        elif p.shape[0] != n:
            shapes = {k: tuple(v.shape) for k, v in probs.items()}
            raise ValueError(f"probs['{name}'] has {p.shape[0]} rows but others have {n}; shapes {shapes}")
        d = list(dists[name])
        if len(d) != p.shape[1]:
            raise ValueError(
                f"dists['{name}'] = {d} has {len(d)} entries but probs['{name}'] has {p.shape[1]} classes"
            )
        if len(d) < 2 or any(not math.isfinite(x) or x < 0 for x in d) or not math.isclose(sum(d), 1.0, abs_tol=1e-6):
            raise ValueError(f"dists['{name}'] = {d} must be >= 2 non-negative numbers summing to 1")
        out[name] = p.detach().to("cpu", torch.float64).numpy()
    return out


def _face_mask(probs: dict[str, np.ndarray]) -> np.ndarray:
    """[N] bool: False for rows that are all -1 in every attribute (no face); other rows must be probabilities."""
    nones = {name: (p == -1).all(1) for name, p in probs.items()}
    stacked = np.stack(list(nones.values()))  # [A, N]
    mixed = np.flatnonzero(stacked.any(0) & ~stacked.all(0)).tolist()
    if mixed:
        where = [k for k, v in nones.items() if v[mixed[0]]]
        raise ValueError(
            f"rows {mixed} are 'no face' (all -1) in some attributes only (row {mixed[0]}: in {where} of {list(probs)}); "
            "expected -1 in every attribute or in none"
        )
    face = ~stacked[0]
    for name, p in probs.items():
        vals = p[face]
        if not np.isfinite(vals).all() or (vals < 0).any():
            raise ValueError(f"probs['{name}'] has face rows with negative or non-finite entries; expected probabilities")
    return face


def _attributes(probs: dict[str, np.ndarray], dists: dict[str, Sequence[float]]) -> list[Attribute]:
    return [Attribute(name, tuple(str(k) for k in range(p.shape[1])), tuple(float(x) for x in dists[name]))
            for name, p in probs.items()]


def _check_age(probs: dict, age_asymmetric: bool) -> None:
    if age_asymmetric and (probs.get("age") is None or probs["age"].shape[1] != 2):
        raise ValueError(f"age_asymmetric needs an attribute 'age' with 2 classes (young, old); got {list(probs)}")


def _cost(probs: dict[str, np.ndarray], age_asymmetric: bool) -> np.ndarray:
    """The joint cost [N, K_joint] of `joint_cost`, on float64 numpy arrays [N, K_a]."""
    _check_age(probs, age_asymmetric)
    sizes = [p.shape[1] for p in probs.values()]
    codes = np.array(list(itertools.product(*[range(k) for k in sizes])), dtype=np.int64).reshape(-1, len(sizes))
    total = 0.0
    for a, (name, p) in enumerate(probs.items()):
        diff2 = (p[:, None, :] - np.eye(p.shape[1])[None, :, :]) ** 2  # [N, K_a (target class), K_a (coordinate)]
        if age_asymmetric and name == "age":
            diff2[:, 1, 0] *= 4.0  # old target: (2 p_young)^2
        total = total + diff2.sum(-1)[:, codes[:, a]]  # [N, K_joint]
    return np.sqrt(total)


def joint_cost(probs: dict[str, torch.Tensor], age_asymmetric: bool = False) -> torch.Tensor:
    """Cost [N, K_joint] (float64, on the probs' device) of giving each joint class to each face.

    Joint classes are row-major in dict order. C[i, j] = sqrt(sum_a ||p_a,i - e_a(j)||^2), e_a(j) the one-hot of j's
    class for attribute a: plain Euclidean, not squared. With ``age_asymmetric`` (attribute "age", classes young, old)
    the young-probability deviation is doubled for an old target: the age term becomes (2 p_young)^2 + (p_old - 1)^2,
    the authors' exp-4 cost (docs/method.md#joint-attributes). Input: {attribute: [N, K_a] probabilities} (no -1 rows).
    """
    device = next(iter(probs.values())).device
    arrays = {k: v.detach().to("cpu", torch.float64).numpy() for k, v in probs.items()}
    return torch.from_numpy(_cost(arrays, age_asymmetric)).to(device)


def _binary(cost: np.ndarray, w1: float) -> np.ndarray:
    """Closed form for two classes: [N, 2] expected plan, w1 the target mass of column 1."""
    n = cost.shape[0]
    order = np.argsort(cost[:, 0] - cost[:, 1], kind="stable")  # ascending advantage of class 1
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n)
    k = n - rank - 1  # face of rank r gets class 1 iff M >= n - r, i.e. M > k
    q = np.empty((n, 2))
    q[:, 1] = bdtrc(k, n, w1)
    q[:, 0] = bdtr(k, n, w1)
    return q


def _compositions(n: int, k: int) -> np.ndarray:
    """All count vectors [M, k] of non-negative integers summing to n (stars and bars)."""
    bars = np.array(list(itertools.combinations(range(n + k - 1), k - 1)), dtype=np.int64).reshape(-1, k - 1)
    m = bars.shape[0]
    edges = np.concatenate([np.full((m, 1), -1), bars, np.full((m, 1), n + k - 1)], axis=1)
    return np.diff(edges, axis=1) - 1


def _unique_rows(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct rows of an int array [S, K] and their multiplicities (lexicographic sort; cheaper than np.unique)."""
    s = rows[np.lexsort(rows.T[::-1])]
    new = np.ones(len(s), dtype=bool)
    new[1:] = (s[1:] != s[:-1]).any(1)
    starts = np.flatnonzero(new)
    return s[starts], np.diff(np.append(starts, len(s)))


def _plan_sum(cost: np.ndarray, counts: np.ndarray, weights: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """sum_m weights[m] * (optimal 0/1 plan for count vector counts[m]) -> [N, K]; each solved exactly (see module).

    cost [N, K], counts [M, K] integers with rows summing to N, weights [M]. The expanded N x N assignment matrices are
    built for a chunk of count vectors at once; the Python loop only calls the solver.
    """
    n, k = cost.shape
    plan = np.zeros(n * k)
    bar = tqdm(total=len(counts), desc="optimal transport", disable=len(counts) < 20000, leave=False)
    for lo in range(0, len(counts), chunk):
        b = counts[lo:lo + chunk]
        m = len(b)
        cols = np.repeat(np.tile(np.arange(k), m), b.ravel()).reshape(m, n)  # [m, N] class of each target slot
        mats = np.ascontiguousarray(cost[:, cols].transpose(1, 0, 2))  # [m, N (faces), N (slots)]
        slot = np.empty((m, n), dtype=np.int64)
        for j in range(m):
            slot[j] = linear_sum_assignment(mats[j])[1]
        assigned = np.take_along_axis(cols, slot, 1)  # [m, N] class given to each face
        flat = (np.arange(n)[None, :] * k + assigned).ravel()
        plan += np.bincount(flat, weights=np.repeat(weights[lo:lo + chunk], n), minlength=n * k)
        bar.update(m)
    bar.close()
    return plan.reshape(n, k)


def _resolve_method(method: str, support: int, n: int, mass: float | None) -> str:
    n_counts = math.comb(n + support - 1, support - 1)
    if method == "auto":
        if mass is not None:
            method = "exact"
        elif support <= 2:
            method = "binary"
        else:
            method = "exact" if n_counts <= EXACT_LIMIT else "monte_carlo"
    if method == "binary" and support > 2:
        raise ValueError(f"method='binary' needs 2 joint classes with positive target mass; this target has {support}")
    if mass is not None and method != "exact":
        raise ValueError(f"mass={mass} truncates exact enumeration only; got method='{method}'")
    if method == "exact" and n_counts > EXACT_HARD_LIMIT:
        raise ValueError(
            f"method='exact' would enumerate {n_counts} count vectors (N={n}, {support} classes), more than "
            f"{EXACT_HARD_LIMIT}; use method='monte_carlo'"
        )
    return method


def expected_targets(
    probs: dict[str, torch.Tensor],
    dists: dict[str, Sequence[float]],
    method: str = "auto",
    samples: int = 100,
    seed: int = 0,
    mass: float | None = None,
    age_asymmetric: bool = False,
    group=None,
) -> dict[str, torch.Tensor]:
    """Expected OT targets q per attribute: {name: [N, K_a]}, each face row sums to 1; no-face rows are -1.

    probs: {attribute: [N, K_a] class probabilities}, the same N for all; a row of all -1 (in every attribute) marks an
    image without a face: it gets -1 and does not count in the OT batch. dists: {attribute: target distribution over
    its K_a classes}; the joint target is their product, joint classes row-major in the order of ``probs``
    (gender x race -> 4 g + r, as ``common.attributes.joint_space``). method: auto | binary | exact | monte_carlo (see
    the module docstring); samples/seed: Monte Carlo samples per process and base seed; mass: truncate ``exact`` to the
    most probable count vectors covering this mass (0.95 = authors' exp-6); age_asymmetric: the authors' exp-4 age
    cost; group: a torch.distributed process group (None = single process, no communication; pass
    ``torch.distributed.group.WORLD`` for the default group): the caller passes the gathered global probs, Monte Carlo
    samples are drawn per process (seed + 1000 rank) and summed, and every process gets the global q.
    Computed without gradient in float64 on the CPU; returned in the probs' dtype promoted to at least float32, on
    their device.
    """
    if method not in METHODS:
        raise ValueError(f"unknown alignment method '{method}'; expected one of {list(METHODS)}")
    if not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be a positive integer, got {samples!r}")
    if mass is not None and not 0 < mass <= 1:
        raise ValueError(f"mass must be in (0, 1], got {mass}")
    arrays = _as_numpy(probs, dists)
    face = _face_mask(arrays)
    _check_age(arrays, age_asymmetric)
    attrs = _attributes(arrays, dists)
    first = next(iter(probs.values()))
    out_dtype = torch.promote_types(first.dtype, torch.float32)
    n = int(face.sum())
    w_joint = np.asarray(joint_target(attrs), dtype=np.float64)
    support = np.flatnonzero(w_joint > 0)
    method = _resolve_method(method, len(support), max(n, 1), mass)
    if n == 0:
        return {name: torch.full(p.shape, -1.0, dtype=out_dtype, device=first.device) for name, p in probs.items()}

    cost = _cost({k: v[face] for k, v in arrays.items()}, age_asymmetric)[:, support]
    w = w_joint[support] / w_joint[support].sum()
    # plan: unnormalised expected plan [n, support]; q = plan / norm. Marginalising before the division keeps Monte
    # Carlo frequencies exact (k / samples correctly rounded), which matters at the threshold (see `assign`).
    if len(support) == 1:
        plan, norm = np.ones((n, 1)), 1.0
    elif method == "binary":
        plan, norm = _binary(cost, float(w[1])), 1.0
    elif method == "exact":
        counts = _compositions(n, len(support))
        logp = gammaln(n + 1) - gammaln(counts + 1).sum(1) + (counts * np.log(w)).sum(1)
        weights = np.exp(logp)
        if mass is not None:  # authors: smallest most-probable prefix whose cumulative weight exceeds `mass`
            # equal weights (permuted count vectors) may differ in the last bit: sort on a rounded key, ties kept in
            # enumeration order, so the cut does not depend on rounding
            order = np.argsort(-np.round(logp, 9), kind="stable")
            keep = min(int(np.searchsorted(np.cumsum(weights[order]), mass, side="right")) + 1, len(order))
            counts, weights = counts[order[:keep]], weights[order[:keep]]
        plan, norm = _plan_sum(cost, counts, weights), float(weights.sum())
    else:
        rank = 0 if group is None else torch.distributed.get_rank(group)
        rng = np.random.default_rng(seed + RANK_SEED_STRIDE * rank)
        uniq, mult = _unique_rows(rng.multinomial(n, w, size=samples))
        plan, norm = _plan_sum(cost, uniq, mult.astype(np.float64)), float(samples)
        if group is not None:
            backend = torch.distributed.get_backend(group)
            dev = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
            buf = torch.from_numpy(np.append(plan.ravel(), norm)).to(dev)
            torch.distributed.all_reduce(buf, group=group)
            buf = buf.cpu().numpy()
            plan, norm = buf[:-1].reshape(plan.shape), float(buf[-1])

    plan_joint = np.zeros((n, len(w_joint)))
    plan_joint[:, support] = plan
    cells = np.asarray(joint_space(attrs), dtype=np.int64).reshape(len(w_joint), len(attrs))  # [K_joint, A]
    out = {}
    for a, (name, p) in enumerate(arrays.items()):
        q = np.full(p.shape, -1.0)
        q[face] = plan_joint @ np.eye(p.shape[1])[cells[:, a]] / norm  # marginal: sum the joint cells of each class
        out[name] = torch.from_numpy(q).to(device=first.device, dtype=out_dtype)
    return out


def assign(q: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets and confidences from expected targets q [N, K]: (argmax q as LongTensor[N] with -1, max q [N]).

    threshold is C, the minimum confidence (0.8 in the paper): a face keeps its target iff max q >= C. The authors
    wrote "drop iff uncertainty 1 - max q > 0.2"; in float64 (and float32) the two rules agree on every value (1 - c
    is exact for c in [0.5, 1], and no float lies between 1 - fl(0.2) and fl(0.8) except fl(0.8), kept by both). A q
    that is exactly C in exact arithmetic must therefore be rounded correctly: `expected_targets` divides integer
    Monte Carlo counts once, after marginalising, so k / samples is correctly rounded. No-face rows (all -1) get
    target -1 and confidence -1. q [N, K] -> (LongTensor[N], Tensor[N]).
    """
    if q.dim() != 2:
        raise ValueError(f"q has shape {tuple(q.shape)}; expected [N, K]")
    confidence, target = q.max(dim=1)
    target = torch.where(confidence >= threshold, target, torch.full_like(target, -1))
    return target, confidence


def alignment_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-image cross-entropy [N] (float32) of logits [N, K] against targets LongTensor[N]; 0 where the target is -1.

    The paper's L_align is the mean of this over the N images of the batch (no-face and low-confidence images count
    in N with 0).
    """
    if logits.dim() != 2 or targets.shape != (logits.shape[0],):
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)}; expected [N, K] and [N]")
    if ((targets < -1) | (targets >= logits.shape[1])).any():
        raise ValueError(f"targets must be -1 or in [0, {logits.shape[1]}); got {targets.tolist()}")
    return F.cross_entropy(logits.float(), targets.long(), ignore_index=-1, reduction="none")
