"""Evaluation metrics: bias of a prompt's images (gender, race, their intersection), frequency of a class and its
distance to a target (age), face-found and low-confidence rates, bootstrap confidence intervals, and the
semantics-preservation scores CLIP-T (image-prompt), CLIP-I and DINO (paired images from the same noise).

Conventions. A prediction vector `pred` is a LongTensor[n] of class indices with -1 for "no face"; every frequency is
taken among the images WITH a face (docs/method.md#metrics). The per-prompt functions are pure (tensors in, floats
out) so that the
trainer's validation and `common.evaluate` compute the same numbers. A prompt without any detected face has undefined
frequencies: its metrics are NaN and means over prompts skip it (`nanmean`), which `summarize` reports as
`n_prompts_without_faces`.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

from common.attributes import Attribute, joint_space, preset, uniform

# ----------------------------------------------------------------------------------------------------------------
# Frequencies and the statistics built on them (vectorised over leading dimensions for the bootstrap)
# ----------------------------------------------------------------------------------------------------------------


def _check_pred(pred: torch.Tensor, num_classes: int) -> torch.Tensor:
    pred = torch.as_tensor(pred)
    if pred.dim() != 1:
        raise ValueError(f"pred must be a 1-D LongTensor [n] of class indices, got shape {list(pred.shape)}")
    if pred.dtype.is_floating_point or pred.dtype == torch.bool:
        raise ValueError(f"pred must hold integer class indices (-1 = no face), got dtype {pred.dtype}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    if pred.numel() and (int(pred.min()) < -1 or int(pred.max()) >= num_classes):
        raise ValueError(
            f"pred holds values in [{int(pred.min())}, {int(pred.max())}]; expected -1 (no face) or a class in "
            f"[0, {num_classes - 1}]"
        )
    return pred.long()


def class_counts(pred: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Number of images predicted as each class: LongTensor[K]; -1 (no face) is not counted."""
    pred = _check_pred(pred, num_classes)
    return torch.bincount(pred[pred >= 0], minlength=num_classes)


def frequencies(pred: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Share of each class among the images with a face: float64 Tensor[K] (all NaN when no image has a face)."""
    counts = class_counts(pred, num_classes).double()
    total = counts.sum()
    return counts / total if total > 0 else torch.full((num_classes,), float("nan"), dtype=torch.float64)


def pairwise_gap(freq: torch.Tensor) -> torch.Tensor:
    """Mean over unordered class pairs i < j of |f_i - f_j|: `freq [..., K]` -> `[...]`. The paper's bias."""
    k = freq.shape[-1]
    diff = (freq[..., :, None] - freq[..., None, :]).abs().sum(dim=(-1, -2))
    return diff / (k * (k - 1))  # every unordered pair appears twice among the K(K-1) ordered ones


def target_distance(freq: torch.Tensor, target: Sequence[float]) -> torch.Tensor:
    """Mean over classes of |f_k - t_k|: `freq [..., K]` -> `[...]`. For age with target (0.75, 0.25) this is the
    authors' `age_gap` (|f_young - 0.75| + |f_old - 0.25|) / 2, which for two classes equals |f_old - 0.25|."""
    t = torch.as_tensor(list(target), dtype=freq.dtype)
    if t.numel() != freq.shape[-1]:
        raise ValueError(f"target has {t.numel()} entries, expected {freq.shape[-1]} (one per class)")
    return (freq - t).abs().mean(-1)


def bias(pred: torch.Tensor, num_classes: int) -> float:
    """The paper's bias of one prompt: mean over unordered class pairs of |freq_i - freq_j| among images with a face.

    `pred`: LongTensor[n], -1 for no face. 0 = balanced; 1 = one gender only (K = 2); 0.5 max for 4 races; 0.25 max
    for the 8 gender x race cells. NaN when no image has a face.
    """
    return float(pairwise_gap(frequencies(pred, num_classes)))


def bias_floor(n: int, target: Sequence[float], draws: int = 20000, seed: int = 0) -> float:
    """Expected bias of `n` images drawn from a sampler whose class probabilities EQUAL `target`: what a perfectly
    debiased model still scores at this sample size (50/50 over 2 classes, n = 32: 0.14; uniform over 4, n = 32: 0.10).
    Monte Carlo over `draws` seeded multinomial draws (standard error ~ 0.5% of the value at the default)."""
    if n < 1:
        raise ValueError(f"n must be >= 1 image, got {n}")
    t = np.asarray(list(target), dtype=np.float64)
    if t.ndim != 1 or len(t) < 2 or (t < 0).any() or abs(t.sum() - 1) > 1e-6:
        raise ValueError(f"target must be a probability vector over >= 2 classes, got {list(target)}")
    counts = np.random.default_rng(seed).multinomial(n, t / t.sum(), size=draws)
    return float(pairwise_gap(torch.from_numpy(counts / n)).mean())


def class_frequency(pred: torch.Tensor, num_classes: int, cls: int) -> float:
    """Share of class `cls` among the images with a face (e.g. freq(old) with cls = 1 for age)."""
    if not 0 <= cls < num_classes:
        raise ValueError(f"class {cls} is outside [0, {num_classes - 1}]")
    return float(frequencies(pred, num_classes)[cls])


def target_gap(pred: torch.Tensor, target: Sequence[float]) -> float:
    """Mean over classes of |freq_k - target_k| among images with a face (see `target_distance`)."""
    return float(target_distance(frequencies(pred, len(target)), target))


def age_metrics(pred: torch.Tensor, target: Sequence[float] = (0.75, 0.25)) -> dict[str, float]:
    """Age of one prompt (class 0 = young, 1 = old): `freq_old` (the project page's "Freq of Age=old"), `old_gap` =
    |freq_old - target_old|, and the authors' training-log `age_gap` = (|f_young - t_young| + |f_old - t_old|) / 2."""
    f = frequencies(pred, 2)
    return {
        "freq_old": float(f[1]),
        "old_gap": float((f[1] - target[1]).abs()),
        "age_gap": float(target_distance(f, target)),
    }


def joint_pred(preds: Sequence[torch.Tensor], num_classes: Sequence[int]) -> torch.Tensor:
    """Joint cell of several attributes' predictions, row-major with the last attribute fastest (gender x race ->
    4 g + r, the order of `common.attributes.joint_space`): LongTensor[n], -1 where any attribute is -1."""
    if len(preds) != len(num_classes) or not preds:
        raise ValueError(f"joint_pred needs one class count per prediction vector, got {len(preds)} and {len(num_classes)}")
    preds = [_check_pred(p, k) for p, k in zip(preds, num_classes)]
    n = preds[0].numel()
    if any(p.numel() != n for p in preds):
        raise ValueError(f"prediction vectors differ in length: {[p.numel() for p in preds]}")
    cell = torch.zeros(n, dtype=torch.long)
    for p, k in zip(preds, num_classes):
        cell = cell * k + p.clamp(min=0)
    missing = torch.stack([p < 0 for p in preds]).any(0)
    return torch.where(missing, torch.full_like(cell, -1), cell)


def predictions(probs: torch.Tensor, found: torch.Tensor) -> torch.Tensor:
    """Argmax class of each image, -1 where no face was found: `probs [n, K]`, `found [n] bool` -> LongTensor[n]."""
    if probs.dim() != 2 or found.shape != probs.shape[:1]:
        raise ValueError(f"expected probs [n, K] and found [n], got {list(probs.shape)} and {list(found.shape)}")
    pred = probs.argmax(-1)
    return torch.where(found.bool(), pred, torch.full_like(pred, -1))


def agreement(pred_a: torch.Tensor, pred_b: torch.Tensor, num_classes: int) -> tuple[float, float]:
    """How well two judges agree on one attribute: (share, Cohen's kappa) over the images where BOTH made a
    prediction (class >= 0 in `pred_a` and `pred_b`, LongTensor[n] each; -1 = no face / no prediction).

    share = p_o, the fraction of compared images with the same class; kappa = (p_o - p_e) / (1 - p_e), where p_e =
    sum_k a_k b_k is the agreement expected by chance from the two judges' class frequencies a, b over the compared
    images. Computed from integer counts, so the values are exact up to the final division. Degenerate cases: no
    compared image -> (NaN, NaN); p_e == 1 (both judges give one and the same class to every compared image, so p_o
    is 1 too) -> kappa NaN, since chance alone explains the agreement and 0/0 has no value; the share is still 1.
    """
    a, b = _check_pred(pred_a, num_classes), _check_pred(pred_b, num_classes)
    if a.numel() != b.numel():
        raise ValueError(f"agreement needs two prediction vectors of one length, got {a.numel()} and {b.numel()}")
    both = (a >= 0) & (b >= 0)
    a, b = a[both], b[both]
    n = int(a.numel())
    if n == 0:
        return float("nan"), float("nan")
    same = int((a == b).sum())
    chance = int((torch.bincount(a, minlength=num_classes) * torch.bincount(b, minlength=num_classes)).sum())
    share = same / n
    if chance == n * n:  # p_e == 1
        return share, float("nan")
    return share, (same * n - chance) / (n * n - chance)  # (p_o - p_e) / (1 - p_e), both scaled by n^2


def face_rate(found: torch.Tensor) -> float:
    """Fraction of images in which a face was detected (NaN for no images)."""
    found = torch.as_tensor(found).bool()
    return float(found.float().mean()) if found.numel() else float("nan")


def low_confidence_rate(probs: torch.Tensor, found: torch.Tensor | None = None, threshold: float = 0.8) -> float:
    """Fraction of the faces whose top class probability is below `threshold` (the authors' `*_pred_below_0.8`).
    `probs [n, K]` (rows sum to 1); `found [n]` restricts to detected faces (None = all rows). NaN if no face."""
    if found is not None:
        probs = probs[torch.as_tensor(found).bool()]
    if probs.shape[0] == 0:
        return float("nan")
    return float((probs.max(-1).values < threshold).float().mean())


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof = 1, NaN for one value) over prompts, NaN entries skipped. The paper's
    "0.23 +/- 0.16" form."""
    v = np.asarray(list(values), dtype=np.float64)
    v = v[~np.isnan(v)]
    if v.size == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else float("nan")


# ----------------------------------------------------------------------------------------------------------------
# Bootstrap
# ----------------------------------------------------------------------------------------------------------------

Stat = Callable[[torch.Tensor], torch.Tensor]
"""A statistic of class frequencies: `freq [..., K]` (float64) -> `[...]` (e.g. `pairwise_gap`)."""

RESAMPLE = ("both", "images", "prompts")


def _resolve_stat(stat: str | Stat, num_classes: int) -> Stat:
    if callable(stat):
        return stat
    if stat == "bias":
        return pairwise_gap
    if stat.startswith("freq") and stat[4:].isdigit():
        c = int(stat[4:])
        if c >= num_classes:
            raise ValueError(f"stat '{stat}': class {c} is outside [0, {num_classes - 1}]")
        return lambda f: f[..., c]
    raise ValueError(f"unknown stat '{stat}'; expected 'bias', 'freq<k>' or a callable freq [..., K] -> [...]")


def bootstrap_ci(
    preds: Sequence[torch.Tensor],
    num_classes: int,
    stat: str | Stat = "bias",
    resample: str = "both",
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the MEAN OVER PROMPTS of a per-prompt frequency statistic.

    `preds`: one LongTensor[n_p] per prompt (-1 = no face). `resample`:
    - "both" (default, two-level): draw the prompts with replacement, then each drawn prompt's images with
      replacement. Accounts for the finite prompt set and the finite images per prompt; the estimand is the mean over
      the population of prompts the test prompts stand for.
    - "images": keep the prompts, redraw each prompt's images (estimand: the mean over THESE prompts of the bias at
      infinitely many images).
    - "prompts": redraw the prompts only, each keeping its observed value.
    Image resampling includes the no-face images, so the number of faces varies as it would in a new draw. Resampled
    prompts left without a face are skipped in the mean. Returns (low, high); NaN if no prompt has a face.
    """
    if resample not in RESAMPLE:
        raise ValueError(f"resample='{resample}': expected one of {RESAMPLE}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    fn = _resolve_stat(stat, num_classes)
    counts = np.stack([np.bincount(_check_pred(p, num_classes).numpy() + 1, minlength=num_classes + 1) for p in preds])
    n = counts.sum(1)  # [P] images per prompt (slot 0 = no face)
    if counts.shape[0] == 0 or n.min() == 0:
        raise ValueError("bootstrap_ci needs at least one prompt and at least one image per prompt")
    rng = np.random.default_rng(seed)
    n_prompts = counts.shape[0]
    idx = rng.integers(0, n_prompts, size=(n_boot, n_prompts)) if resample != "images" else None
    if resample == "prompts":
        draws = counts[idx]  # [B, P, K+1]
    else:
        pvals = counts / n[:, None]
        if resample == "images":
            draws = rng.multinomial(np.broadcast_to(n, (n_boot, n_prompts)), np.broadcast_to(pvals, (n_boot,) + pvals.shape))
        else:
            draws = rng.multinomial(n[idx], pvals[idx])
    faces = draws[..., 1:].astype(np.float64)
    total = faces.sum(-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        freq = np.where(total > 0, faces / total, np.nan)
    values = fn(torch.from_numpy(freq)).numpy()  # [B, P]
    with warnings.catch_warnings():  # resamples whose prompts all lack a face give NaN: skipped below
        warnings.simplefilter("ignore", RuntimeWarning)
        means = np.nanmean(values, axis=1)
    if np.all(np.isnan(means)):
        return float("nan"), float("nan")
    alpha = (1 - level) / 2
    lo, hi = np.nanquantile(means, [alpha, 1 - alpha])
    return float(lo), float(hi)


def bootstrap_mean_ci(values: Sequence[float], n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of per-prompt values (e.g. CLIP-T), resampling prompts; NaN skipped."""
    v = np.asarray(list(values), dtype=np.float64)
    v = v[~np.isnan(v)]
    if v.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(n_boot, v.size))].mean(1)
    alpha = (1 - level) / 2
    lo, hi = np.quantile(means, [alpha, 1 - alpha])
    return float(lo), float(hi)


# ----------------------------------------------------------------------------------------------------------------
# Semantics preservation: CLIP-T, CLIP-I, DINO
# ----------------------------------------------------------------------------------------------------------------

DEFAULT_CLIP_T = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
"""the CLIP the authors trained with (`common.features.CLIP_ID`); which CLIP the paper's CLIP-T used is unknown"""


def load_clip_model(name: str = DEFAULT_CLIP_T, device="cpu", dtype=torch.float32):
    """A transformers `CLIPModel` (both towers, needed for CLIP-T) from a hub id or local folder, or "tiny" (random
    small config, seed 0, 32 px input, for tests). Offline without a local copy: one clear error."""
    from transformers import CLIPConfig, CLIPModel

    if name == "tiny":
        text = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                      patch_size=8)
        with torch.random.fork_rng(devices=[]):  # fixed weights without touching the caller's RNG
            torch.manual_seed(0)
            model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    else:
        try:
            model = CLIPModel.from_pretrained(name)
        except OSError as e:
            raise OSError(
                f"Could not load the CLIP model '{name}' for CLIP-T (no local copy and the hub is not reachable or "
                "HF_HUB_OFFLINE=1). Download it on a connected machine (`huggingface-cli download "
                f"{name}`) and pass its folder, or leave CLIP-T out."
            ) from e
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def _features(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def clip_preprocess(images: torch.Tensor, size: int) -> torch.Tensor:
    """`[N, 3, H, W] in [-1, 1]` -> CLIP input `[N, 3, size, size]`: bicubic resize (antialiased) of the square image,
    then CLIP's mean/std normalisation (CLIP's own evaluation protocol; the training regulariser in `common.features`
    resizes bilinearly without antialias, as the authors). Non-square images are centre-cropped first."""
    h, w = images.shape[-2:]
    if h != w:
        s = min(h, w)
        top, left = (h - s) // 2, (w - s) // 2
        images = images[..., top : top + s, left : left + s]
    x = (images.float() + 1) / 2
    if x.shape[-1] != size:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    from common.features import CLIP_MEAN, CLIP_STD

    mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
    return (x.clamp(0, 1) - mean) / std


@torch.no_grad()
def clip_score(images: torch.Tensor, prompts: Sequence[str], model, tokenizer=None, batch_size: int = 32) -> torch.Tensor:
    """CLIP-T: cosine similarity between each image and its prompt, `images [N, 3, H, W] in [-1, 1]`, `prompts` N
    strings -> Tensor[N] in [-1, 1] (the raw cosine, not CLIPScore's 100 * max(cos, 0)). `model`: a transformers
    CLIPModel; `tokenizer`: default the offline OpenAI CLIP tokenizer (prompts truncated to 77 tokens)."""
    if len(prompts) != images.shape[0]:
        raise ValueError(f"clip_score got {images.shape[0]} images but {len(prompts)} prompts")
    if tokenizer is None:
        from common.models import clip_tokenizer

        tokenizer = clip_tokenizer()
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    size = model.config.vision_config.image_size
    max_len = min(77, model.config.text_config.max_position_embeddings)
    out = []
    for s in range(0, images.shape[0], batch_size):
        tok = tokenizer(list(prompts[s : s + batch_size]), padding=True, truncation=True, max_length=max_len,
                        return_tensors="pt")
        t = _features(model.get_text_features(input_ids=tok.input_ids.to(device),
                                              attention_mask=tok.attention_mask.to(device)))
        px = clip_preprocess(images[s : s + batch_size].to(device), size).to(dtype)
        v = _features(model.get_image_features(pixel_values=px))
        out.append(torch.nn.functional.cosine_similarity(v.float(), t.float(), dim=-1).cpu())
    return torch.cat(out) if out else torch.zeros(0)


@torch.no_grad()
def paired_similarity(images: torch.Tensor, reference: torch.Tensor, encoder, batch_size: int = 32) -> torch.Tensor:
    """CLIP-I / DINO: cosine similarity of each image to its paired reference image (the original model's image from
    the same noise). `images`, `reference`: `[N, 3, H, W] in [-1, 1]`; `encoder`: a `common.features.load_image_encoder`
    callable (L2-normalised `[N, D]` output; renormalised here anyway) -> Tensor[N]."""
    if images.shape[0] != reference.shape[0]:
        raise ValueError(f"paired_similarity got {images.shape[0]} images but {reference.shape[0]} reference images")
    out = []
    for s in range(0, images.shape[0], batch_size):
        a = encoder(images[s : s + batch_size]).float()
        b = encoder(reference[s : s + batch_size]).float()
        out.append(torch.nn.functional.cosine_similarity(a, b, dim=-1).cpu())
    return torch.cat(out) if out else torch.zeros(0)


# ----------------------------------------------------------------------------------------------------------------
# Summary over prompts
# ----------------------------------------------------------------------------------------------------------------


def _as_attribute(a: Attribute | str, num_classes: int) -> Attribute:
    if isinstance(a, Attribute):
        attr = a
    else:
        try:
            attr = preset(a)
        except KeyError:
            attr = Attribute(a, tuple(str(i) for i in range(num_classes)), uniform(num_classes))
    if attr.num_classes != num_classes:
        raise ValueError(f"attribute '{attr.name}' has {attr.num_classes} classes but its probabilities have {num_classes}")
    return attr


def _is_uniform(attr: Attribute) -> bool:
    return all(math.isclose(t, 1.0 / attr.num_classes, abs_tol=1e-9) for t in attr.target)


def target_kind(attr: Attribute) -> str:
    """The name of `attr`'s per-prompt figure: "bias" when its target is uniform (the paper's bias assumes one), else
    "gap" (mean |f - target|: the authors' age bias for a 75/25 target, where the bias would reward 50/50)."""
    return "bias" if _is_uniform(attr) else "gap"


def distance_to_target(pred: torch.Tensor, attr: Attribute) -> tuple[str, float]:
    """How far one prompt's images are from `attr`'s target: (`target_kind(attr)`, its value). `pred`: LongTensor[n]
    classes, -1 for no face. The one rule by which `summarize` (so validation and evaluation, `Judges.measure`) and
    the trainer's step logs name and compute their per-attribute figure."""
    f = frequencies(pred, attr.num_classes)
    kind = target_kind(attr)
    return kind, float(pairwise_gap(f) if kind == "bias" else target_distance(f, attr.target))


def summarize(
    table: Mapping,
    attrs: Sequence[Attribute | str],
    threshold: float = 0.8,
    n_boot: int = 1000,
    level: float = 0.95,
    resample: str = "both",
    seed: int = 0,
) -> dict:
    """Per-prompt metrics, their mean +/- std over prompts and bootstrap intervals.

    `table`: {"prompt": LongTensor[N] prompt index of each image, "found": BoolTensor[N] face detected,
    "probs": {attribute name: Tensor[N, K_a] class probabilities} (rows of undetected images are ignored),
    optional "scores": {name: Tensor[N] per-image scores such as clip_t / clip_i / dino, NaN = missing}}.
    `attrs`: the attributes to measure (Attribute objects, or preset names gender / race / age; other names get
    uniform targets and class names "0", "1", ...).

    Metrics (per prompt): `face_rate`; per attribute a: `{a}_freq_{class}` for every class, `{a}_low_conf` (top
    probability < `threshold` among faces), and `{a}_bias` for a uniform target (the paper's bias assumes one) or
    `{a}_gap` otherwise (mean |f - target|; for age the authors' age_gap); for every pair of uniform-target
    attributes (and all of them when more than two) the joint `{a}_{b}_bias` over the K_a * K_b cells (gender x
    race: K = 8); every score as its per-prompt mean (its interval resamples prompts, `bootstrap_mean_ci`).
    Returns {"metrics": [names], "per_prompt": {name: {prompt: value}}, "mean": {...}, "std": {...},
    "ci": {name: (low, high)} (bias / freq / gap metrics, `bootstrap_ci` with `resample`; `n_boot` = 0 skips),
    "n_images", "n_prompts", "n_prompts_without_faces", "bootstrap": {settings}}.
    """
    prompt = torch.as_tensor(table["prompt"]).long()
    found = torch.as_tensor(table["found"]).bool()
    probs_all = table["probs"]
    if found.shape != prompt.shape:
        raise ValueError(f"table['found'] has shape {list(found.shape)}, expected {list(prompt.shape)} like table['prompt']")
    specs: list[Attribute] = []
    probs: dict[str, torch.Tensor] = {}
    preds: dict[str, torch.Tensor] = {}
    for a in attrs:
        name = a.name if isinstance(a, Attribute) else a
        if name not in probs_all:
            raise KeyError(f"table['probs'] has no attribute '{name}'; it has {sorted(probs_all)}")
        p = torch.as_tensor(probs_all[name]).float()
        if p.shape[0] != prompt.shape[0]:
            raise ValueError(f"table['probs']['{name}'] has {p.shape[0]} rows, expected {prompt.shape[0]}")
        spec = _as_attribute(a, p.shape[1])
        specs.append(spec)
        probs[name] = p
        preds[name] = predictions(p, found)

    prompts = sorted(set(prompt.tolist()))
    per_prompt: dict[str, dict[int, float]] = {}
    ci_jobs: dict[str, tuple[str, int, str | Stat]] = {}  # metric -> (prediction key, K, stat)

    def put(metric: str, i: int, value: float):
        per_prompt.setdefault(metric, {})[i] = value

    balanced = [s for s in specs if _is_uniform(s)]  # the bias assumes a uniform target (docs/method.md#metrics)
    joints: list[tuple[Attribute, ...]] = list(itertools.combinations(balanced, 2))
    if len(balanced) > 2:
        joints.append(tuple(balanced))
    for combo in joints:
        key = "_".join(a.name for a in combo)
        preds[key] = joint_pred([preds[a.name] for a in combo], [a.num_classes for a in combo])

    for i in prompts:
        rows = prompt == i
        put("face_rate", i, face_rate(found[rows]))
        for spec in specs:
            a = spec.name
            pr = preds[a][rows]
            kind, value = distance_to_target(pr, spec)
            put(f"{a}_{kind}", i, value)
            ci_jobs[f"{a}_{kind}"] = (a, spec.num_classes, "bias" if kind == "bias" else
                                      lambda fr, t=spec.target: target_distance(fr, t))
            f = frequencies(pr, spec.num_classes)
            for c, cname in enumerate(spec.classes):
                put(f"{a}_freq_{cname}", i, float(f[c]))
                ci_jobs[f"{a}_freq_{cname}"] = (a, spec.num_classes, f"freq{c}")
            put(f"{a}_low_conf", i, low_confidence_rate(probs[a][rows], found[rows], threshold))
        for combo in joints:
            key = "_".join(a.name for a in combo)
            k = len(joint_space(combo))
            put(f"{key}_bias", i, bias(preds[key][rows], k))
            ci_jobs[f"{key}_bias"] = (key, k, "bias")

    for name, values in (table.get("scores") or {}).items():
        v = torch.as_tensor(values, dtype=torch.float64)
        if v.shape != prompt.shape:
            raise ValueError(f"table['scores']['{name}'] has shape {list(v.shape)}, expected {list(prompt.shape)}")
        for i in prompts:
            vi = v[(prompt == i) & ~v.isnan()]
            put(name, i, float(vi.mean()) if vi.numel() else float("nan"))

    metrics = list(per_prompt)
    mean, std, ci = {}, {}, {}
    for m in metrics:
        mean[m], std[m] = mean_std(per_prompt[m].values())
    if n_boot > 0:
        for m, (key, k, stat) in ci_jobs.items():
            groups = [preds[key][prompt == i] for i in prompts]
            ci[m] = bootstrap_ci(groups, k, stat=stat, resample=resample, n_boot=n_boot, level=level, seed=seed)
        for name in table.get("scores") or {}:
            ci[name] = bootstrap_mean_ci(per_prompt[name].values(), n_boot=n_boot, level=level, seed=seed)
    no_face = sum(1 for i in prompts if not bool(found[prompt == i].any()))
    return {
        "metrics": metrics,
        "per_prompt": per_prompt,
        "mean": mean,
        "std": std,
        "ci": ci,
        "n_images": int(prompt.numel()),
        "n_prompts": len(prompts),
        "n_prompts_without_faces": no_face,
        "bootstrap": {"resample": resample, "n_boot": n_boot, "level": level, "seed": seed},
    }


def flatten_summary(summary: dict, prefix: str = "", per_prompt: bool = True) -> dict[str, float]:
    """Flat scalars for loggers: `{prefix}{metric}` (mean over prompts), `_std`, `_ci_low`, `_ci_high`, and with
    `per_prompt` `{prefix}{metric}_p{index}` for every prompt."""
    out: dict[str, float] = {}
    for m in summary["metrics"]:
        out[f"{prefix}{m}"] = summary["mean"][m]
        out[f"{prefix}{m}_std"] = summary["std"][m]
        if m in summary["ci"]:
            out[f"{prefix}{m}_ci_low"], out[f"{prefix}{m}_ci_high"] = summary["ci"][m]
        if per_prompt:
            for i, v in summary["per_prompt"][m].items():
                out[f"{prefix}{m}_p{i}"] = v
    return out
