"""The per-image training loss: distributional-alignment cross-entropy, CLIP/DINO semantics preservation with dynamic
weights and face-region gradient factors, and face realism (docs/method.md#preservation-losses).

Everything here is a pure function of tensors, plus `FairnessLoss`, which holds one step's no-grad context (the
judges' `common.judges.Judgement` of the finetuned and original images, targets, original features) and evaluates the
loss of a micro-batch of finetuned images WITH gradient. Fixes of the authors' code: an original image without a face
gets no face region (their slicing bug, docs/method.md#no-face-in-the-original-image); the loss is a sum over images
divided by the images per process, so micro-batches of unequal size are weighted fairly
(docs/method.md#unequal-micro-batches).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from common.alignment import alignment_loss
from common.judges import Judgement, head_logits

# ----------------------------------------------------------------------------------------------------------------
# Weights and gradient factors
# ----------------------------------------------------------------------------------------------------------------


def flip_factor(
    targets: Mapping[str, torch.Tensor], orig_pred: Mapping[str, torch.Tensor], factors: Mapping[str, float]
) -> torch.Tensor:
    """Per-image factor [N]: 1 when every attribute's target equals the original image's prediction, otherwise the
    smallest factor among the attributes that differ. A dropped target (-1) differs unless the original had no face
    either (-1 too), as the authors' rule."""
    attrs = list(targets)
    n = targets[attrs[0]].shape[0]
    out = torch.ones(n, device=targets[attrs[0]].device)
    for a in attrs:
        differs = targets[a].to(out.device) != orig_pred[a].to(out.device)
        out = torch.where(differs, torch.minimum(out, torch.full_like(out, float(factors[a]))), out)
    return out


def dynamic_weights(
    targets: Mapping[str, torch.Tensor],
    orig_pred: Mapping[str, torch.Tensor],
    found: torch.Tensor,
    factors1: Mapping[str, float],
    no_face_weight: float | None = None,
) -> torch.Tensor:
    """CLIP/DINO weight per image [N] (multiplied by w_img): `flip_factor` with factor1 for images with a face;
    `no_face_weight` for images without one (default: 1 for a single attribute, min factor1 for several, as the authors)."""
    if no_face_weight is None:
        no_face_weight = 1.0 if len(factors1) == 1 else min(factors1.values())
    w = flip_factor(targets, orig_pred, factors1)
    return torch.where(found.to(w.device), w, torch.full_like(w, float(no_face_weight)))


def kept_classes(orig: Judgement, attrs, threshold: float) -> dict[str, torch.Tensor]:
    """Targets [N] per kept attribute: the original image's class where it has a face classified with confidence >=
    `threshold`, else -1 (no target)."""
    out = {}
    for a in attrs:
        ok = orig.found.to(orig.pred[a].device) & (orig.conf[a] >= threshold)
        out[a] = torch.where(ok, orig.pred[a], torch.full_like(orig.pred[a], -1))
    return out


def kept_share(pred: torch.Tensor, orig_pred: torch.Tensor) -> float:
    """Share of the images with a face in both (class >= 0 in `pred` and `orig_pred`, [N] each) whose class equals the
    original's; nan when no image has a face in both. The demo's `{attribute}_changed_after` is 1 minus this."""
    both = (pred >= 0) & (orig_pred.to(pred.device) >= 0)
    return float((pred[both] == orig_pred.to(pred.device)[both]).double().mean()) if both.any() else float("nan")


def box_intersection_mask(
    boxes_a: torch.Tensor, boxes_b: torch.Tensor, valid: torch.Tensor, height: int, width: int
) -> torch.Tensor:
    """[N, 1, H, W] bool: pixels inside both boxes [N, 4] (x1, y1, x2, y2; exclusive right/bottom, clipped to the
    image); all False where `valid` [N] is False (e.g. the original image had no face)."""
    x1 = torch.maximum(boxes_a[:, 0], boxes_b[:, 0]).clamp(0, width)
    y1 = torch.maximum(boxes_a[:, 1], boxes_b[:, 1]).clamp(0, height)
    x2 = torch.minimum(boxes_a[:, 2], boxes_b[:, 2]).clamp(0, width)
    y2 = torch.minimum(boxes_a[:, 3], boxes_b[:, 3]).clamp(0, height)
    dev = boxes_a.device
    xs = torch.arange(width, device=dev).view(1, 1, width)
    ys = torch.arange(height, device=dev).view(1, height, 1)
    inside = (xs >= x1.view(-1, 1, 1)) & (xs < x2.view(-1, 1, 1)) & (ys >= y1.view(-1, 1, 1)) & (ys < y2.view(-1, 1, 1))
    return (inside & valid.view(-1, 1, 1).to(dev)).unsqueeze(1)


def scale_gradient(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Identity in value; the gradient reaching `x` is multiplied by `factor` (broadcastable to x)."""
    y = x.clone()
    if y.requires_grad:
        factor = factor.to(device=x.device, dtype=x.dtype)
        y.register_hook(lambda g: g * factor)
    return y


def cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """1 - cos per row: [N, D], [N, D] -> [N]."""
    return 1 - F.cosine_similarity(a.float(), b.float(), dim=-1)


# ----------------------------------------------------------------------------------------------------------------
# The step's loss
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class LossWeights:
    w_img: float
    w_face: float
    factor1: dict[str, float]
    factor2: dict[str, float]
    face_confidence: float
    no_face_weight: float | None = None


class FairnessLoss:
    """One step's loss over this process's N finetuned images, evaluated micro-batch by micro-batch with gradient.

    Built once per step from no-grad information: the finetuned images' judgement (`gen`, whose boxes and landmarks are
    reused: the with-gradient images are the same images), the original images' judgement (`orig`), the alignment
    targets [N] per attribute, the original images' features per encoder [N, D], and their face features [N, 512].
    """

    def __init__(
        self,
        *,
        classifier,
        heads: Mapping[str, str],
        gen: Judgement,
        orig: Judgement,
        targets: Mapping[str, torch.Tensor],
        weights: LossWeights,
        encoders: Sequence[Callable] = (),
        orig_features: Sequence[torch.Tensor] = (),
        face_encoder: Callable | None = None,
        orig_face_features: torch.Tensor | None = None,
        face_bank=None,
        denominator: int | None = None,
        keep_heads: Mapping[str, str] | None = None,
        keep_targets: Mapping[str, torch.Tensor] | None = None,
        w_keep: float = 0.0,
    ):
        self.classifier, self.heads, self.gen, self.orig = classifier, dict(heads), gen, orig
        self.targets = {a: t.long() for a, t in targets.items()}
        self.weights, self.encoders, self.orig_features = weights, list(encoders), list(orig_features)
        self.face_encoder, self.orig_face_features, self.face_bank = face_encoder, orig_face_features, face_bank
        self.keep_heads = dict(keep_heads or {})
        self.keep_targets = {a: t.long() for a, t in (keep_targets or {}).items()}
        if set(self.keep_heads) != set(self.keep_targets):
            raise ValueError(f"keep_heads {sorted(self.keep_heads)} and keep_targets {sorted(self.keep_targets)} "
                             "must name the same attributes")
        self.w_keep = float(w_keep)
        n = gen.found.shape[0]
        self.denominator = denominator or n
        found = gen.found
        self.dyn_w = dynamic_weights(self.targets, orig.pred, found, weights.factor1, weights.no_face_weight)
        self.region_factor = flip_factor(self.targets, orig.pred, weights.factor2)
        # realism target: the original face when the targets keep its confident classes, else the bank's nearest face
        keep = orig.found.clone()
        for a, t in self.targets.items():
            keep &= (t == orig.pred[a]) & (t >= 0) & (orig.conf[a] >= weights.face_confidence)
        self.use_orig_face = keep & found
        any_target = torch.zeros_like(found)
        for t in self.targets.values():
            any_target |= t >= 0
        # one attribute: only faces with a target (authors' exp-1/2/6); several: every detected face (exp-3/4/5)
        self.realism_on = found & (any_target if len(self.targets) == 1 else torch.ones_like(found))

    def __call__(self, images: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss of the finetuned images `images` [B, 3, H, W] in [-1, 1] (with gradient) that are rows `idx` [B] of the
        step's batch. Returns (sum over the B images / denominator, per-term sums for logging)."""
        from common.faces import align_faces, crop_faces

        gen, orig = self.gen.faces, self.orig.faces
        dev = images.device
        found = gen.found[idx].to(dev)
        total = images.new_zeros(())
        logs: dict[str, float] = {}

        # distributional alignment: one CE per attribute on the faces that got a target; kept attributes: the same CE
        # towards the original image's class, weighted by w_keep
        if found.any():
            crops = crop_faces(images, gen.boxes[idx].to(dev), self.classifier.input_size)
            logits = head_logits(self.classifier, crops, {**self.heads, **self.keep_heads})
            none = torch.full_like(found, -1, dtype=torch.long)
            for term, heads, targets, w in (("align", self.heads, self.targets, 1.0),
                                            ("keep", self.keep_heads, self.keep_targets, self.w_keep)):
                for a in heads:
                    ce = alignment_loss(logits[a], torch.where(found, targets[a][idx].to(dev), none))
                    total = total + w * ce.sum()
                    logs[f"loss_{term}_{a}"] = ce.sum().item()

        # semantics preservation against the original image from the same noise
        if self.encoders:
            h, w = images.shape[-2:]
            both = found & orig.found[idx].to(dev)
            region = box_intersection_mask(gen.boxes[idx].to(dev), orig.boxes[idx].to(dev), both, h, w)
            factor = torch.where(region, self.region_factor[idx].to(dev).view(-1, 1, 1, 1), torch.ones((), device=dev))
            hooked = scale_gradient(images, factor)
            dyn = self.dyn_w[idx].to(dev)
            for k, (enc, ref) in enumerate(zip(self.encoders, self.orig_features)):
                d = cosine_distance(enc(hooked), ref[idx].to(dev))
                total = total + self.weights.w_img * (dyn * d).sum()
                logs[f"loss_sem_{k}"] = d.sum().item()

        # face realism
        on = self.realism_on[idx].to(dev)
        if self.face_encoder is not None and self.weights.w_face > 0 and on.any():
            aligned = align_faces(images, gen.landmarks[idx].to(dev))
            f = self.face_encoder(aligned).float()
            use_orig = self.use_orig_face[idx].to(dev)
            target = torch.zeros_like(f)
            if self.orig_face_features is not None:
                target = torch.where(use_orig[:, None], self.orig_face_features[idx].to(dev).float(), target)
            if self.face_bank is not None:
                with torch.no_grad():
                    nn_feat = self.face_bank.nearest(f.detach())
                target = torch.where(use_orig[:, None], target, nn_feat.to(dev).float())
            else:  # no bank: only the faces whose original is a valid target
                on = on & use_orig
            d = cosine_distance(f, target)
            total = total + self.weights.w_face * (d * on).sum()
            logs["loss_face"] = (d * on).sum().item()

        return total / self.denominator, logs
