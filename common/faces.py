"""Batched face detection, the authors' square face crop and the differentiable 5-point alignment.

Pipeline (docs/method.md#face-pipeline, batched instead of one image at a time on the CPU):
1. a `FaceDetector` (MTCNN from facenet-pytorch by default) returns, per image, the largest face (box area clipped to
   the image), its 5 landmarks (left eye, right eye, nose, left mouth corner, right mouth corner) and its score;
2. `expand_boxes` turns the raw box into the authors' square box (coefficient 0.5, rounded);
3. `crop_faces` cuts that box out of the image, pads out-of-image parts with -1 and resizes it to 224 with bilinear
   interpolation, no antialias; it is one batched `grid_sample`, equal to pad + slice + `interpolate` per image;
4. `align_faces` fits a least-squares similarity from the landmarks to the ArcFace 112 template (closed form, batched)
   and warps the image with `grid_sample`.
Detection runs without gradient; crops and aligned faces are differentiable with respect to the images, so the trainer
detects once on the no-grad images and re-crops the identical with-grad images with `crop_faces` / `align_faces`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F

from common.registry import registry
from common.runtime import device_chunks

# ArcFace 112x112 template (pixel centres at integer coordinates, as cv2 / skimage): left eye, right eye, nose,
# left mouth corner, right mouth corner.
ARCFACE_TEMPLATE = torch.tensor(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=torch.float64,
)
ARCFACE_SIZE = 112


# ----------------------------------------------------------------------------------------------------------------
# Result container
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Faces:
    """Per-image result of `detect`. Rows where `found` is False hold -1 everywhere (boxes, landmarks, crops,
    aligned) and score 0.

    found [N] bool; boxes [N, 4] int64 (expanded square box x1, y1, x2, y2, exclusive ends as in slicing);
    raw_boxes [N, 4] float (detector box); landmarks [N, 5, 2] float (x, y); scores [N] float;
    crops [N, 3, S, S] in [-1, 1]; aligned [N, 3, A, A] in [-1, 1].
    """

    found: torch.Tensor
    boxes: torch.Tensor
    raw_boxes: torch.Tensor
    landmarks: torch.Tensor
    scores: torch.Tensor
    crops: torch.Tensor
    aligned: torch.Tensor

    def slice(self, idx) -> Faces:
        """The same fields indexed by `idx` (int slice, index tensor or bool mask along N)."""
        if isinstance(idx, int):
            idx = slice(idx, idx + 1)
        return Faces(**{f.name: getattr(self, f.name)[idx] for f in fields(self)})

    def __len__(self) -> int:
        return int(self.found.shape[0])


# ----------------------------------------------------------------------------------------------------------------
# Detector protocol and registry
# ----------------------------------------------------------------------------------------------------------------


@runtime_checkable
class FaceDetector(Protocol):
    """A batched face detector: `images [N, 3, H, W] in [-1, 1]` -> (found [N] bool, raw_boxes [N, 4] float (x1, y1,
    x2, y2; -1 where none), landmarks [N, 5, 2] float (-1 where none), scores [N] float (0 where none)).

    It returns ONE face per image (the largest). An optional float attribute `expansion` sets the square-expansion
    coefficient `detect` uses for its boxes (0.5 when absent, the authors' value for their detector)."""

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]: ...


DETECTORS = registry("face detector")
"""`factory(**options) -> FaceDetector` by name: mtcnn, whole-image, and the plug-ins' (the toy world's)"""


def register_detector(name: str, factory: Callable[..., FaceDetector] | str, synthetic: bool = False) -> None:
    """Register a detector factory under `name` (a callable taking keyword options, or a "module:attr" string
    imported on first use)."""
    DETECTORS.register(name, factory, synthetic=synthetic)


def get_detector(name: str, **kw) -> FaceDetector:
    """A new detector instance by registry name ("mtcnn", "whole-image", or one registered by you or a plug-in)."""
    return DETECTORS.create(name, **kw)


_DEFAULT_INSTANCES: dict[str, FaceDetector] = {}


def _default_detector(name: str) -> FaceDetector:
    """One shared default-configured instance per name (MTCNN weights are loaded once)."""
    if name not in _DEFAULT_INSTANCES:
        _DEFAULT_INSTANCES[name] = get_detector(name)
    return _DEFAULT_INSTANCES[name]


def to_pixels(images: torch.Tensor) -> torch.Tensor:
    """[N, 3, H, W] in [-1, 1] -> [N, H, W, 3] float32 in {0, ..., 255} (rounded like a saved 8-bit image)."""
    return ((images.detach().float() + 1) * 127.5).round().clamp(0, 255).permute(0, 2, 3, 1).contiguous()


class MTCNNDetector:
    """facenet-pytorch MTCNN (weights ship in the wheel), run on the images' device on the whole batch.

    Configurable: `min_face_size` (pixels), `thresholds` (P-, R-, O-net score thresholds; the last one is the final
    face score threshold) and the pyramid `factor`. The largest face per image is selected by box area clipped to the
    image, vectorised over all faces of the batch.
    """

    expansion = 0.5

    def __init__(self, min_face_size: int = 20, thresholds=(0.6, 0.7, 0.7), factor: float = 0.709):
        from facenet_pytorch import MTCNN

        self.mtcnn = MTCNN(
            keep_all=True, min_face_size=min_face_size, thresholds=list(thresholds), factor=factor, device="cpu"
        ).eval()

    @torch.no_grad()
    def __call__(self, images: torch.Tensor):
        from facenet_pytorch.models.utils.detect_face import detect_face

        n, _, h, w = images.shape
        dev = images.device
        if self.mtcnn.device != dev:
            self.mtcnn.to(dev)
            self.mtcnn.device = dev
        m = self.mtcnn
        batch_boxes, batch_points = [], []
        for part in device_chunks(n, dev):  # each image's detections are independent of the others in its call
            b, p = detect_face(to_pixels(images[part]), m.min_face_size, m.pnet, m.rnet, m.onet, m.thresholds,
                               m.factor, dev)
            batch_boxes += list(b)
            batch_points += list(p)
        # MTCNN returns ragged per-image object arrays; unpack them once, then everything is vectorised.
        counts = torch.tensor([len(b) for b in batch_boxes], dtype=torch.long)
        found = counts > 0
        raw = torch.full((n, 4), -1.0, device=dev)
        marks = torch.full((n, 5, 2), -1.0, device=dev)
        scores = torch.zeros(n, device=dev)
        if not bool(found.any()):
            return found.to(dev), raw, marks, scores
        all_boxes = torch.from_numpy(
            np.concatenate([np.asarray(b, dtype=np.float32).reshape(-1, 5) for b in batch_boxes], axis=0)
        ).to(dev)
        all_points = torch.from_numpy(
            np.concatenate([np.asarray(p, dtype=np.float32).reshape(-1, 5, 2) for p in batch_points], axis=0)
        ).to(dev)
        owner = torch.repeat_interleave(torch.arange(n), counts).to(dev)
        best = largest_per_image(all_boxes[:, :4], owner, n, (h, w))
        found = found.to(dev)
        sel = best[found]
        raw[found] = all_boxes[sel, :4]
        scores[found] = all_boxes[sel, 4]
        marks[found] = all_points[sel]
        return found, raw, marks, scores


def largest_per_image(boxes: torch.Tensor, owner: torch.Tensor, n: int, hw: tuple[int, int]) -> torch.Tensor:
    """Index (into `boxes` [F, 4]) of the largest box of each of `n` images, by area clipped to the image `hw`; ties
    go to the first box; -1 for images owning no box. `owner` [F] is each box's image index."""
    h, w = hw
    cw = (boxes[:, 2].clamp(0, w) - boxes[:, 0].clamp(0, w)).clamp(min=0)
    ch = (boxes[:, 3].clamp(0, h) - boxes[:, 1].clamp(0, h)).clamp(min=0)
    area = cw * ch
    best_area = torch.full((n,), -1.0, device=boxes.device).scatter_reduce(0, owner, area, "amax")
    is_best = area == best_area[owner]
    idx = torch.arange(len(boxes), device=boxes.device)
    first = torch.full((n,), len(boxes), device=boxes.device).scatter_reduce(
        0, owner[is_best], idx[is_best], "amin"
    )
    return torch.where(first == len(boxes), torch.full_like(first, -1), first)


class WholeImageDetector:
    """For non-photographic worlds: every image is one face whose box is the whole image and whose landmarks are the
    ArcFace template scaled to the image, so the aligned face is the whole image resized, and so is the crop.
    Expansion 0: the box stays the image (square images) or becomes the centred square around it."""

    expansion = 0.0

    def __call__(self, images: torch.Tensor):
        n, _, h, w = images.shape
        dev = images.device
        raw = torch.tensor([0.0, 0.0, w, h], device=dev).expand(n, 4).clone()
        scale = torch.tensor([w / ARCFACE_SIZE, h / ARCFACE_SIZE], dtype=torch.float64)
        # pixel-centre scaling, so that the aligned face equals interpolate(image, 112, align_corners=False)
        marks = ((ARCFACE_TEMPLATE + 0.5) * scale - 0.5).float().to(dev).expand(n, 5, 2).clone()
        return torch.ones(n, dtype=torch.bool, device=dev), raw, marks, torch.ones(n, device=dev)


register_detector("mtcnn", MTCNNDetector)
register_detector("whole-image", WholeImageDetector)


# ----------------------------------------------------------------------------------------------------------------
# Boxes and crops
# ----------------------------------------------------------------------------------------------------------------


def expand_boxes(raw_boxes: torch.Tensor, coef: float = 0.5) -> torch.Tensor:
    """The authors' square expansion of [N, 4] boxes (x1, y1, x2, y2) -> [N, 4] int64.

    w = x2 - x1, h = y2 - y1; if h / w > 1: more_h = coef h, more_w = (h + more_h) - w; otherwise more_w = coef w,
    more_h = (w + more_w) - h; new box = round(x1 - more_w/2, y1 - more_h/2, x2 + more_w/2, y2 + more_h/2) (round half
    to even, like Python's round). Side = (1 + coef) max(w, h). Rows of -1 (no face) stay -1.
    """
    b = raw_boxes.double()
    x1, y1, x2, y2 = b.unbind(-1)
    w, h = x2 - x1, y2 - y1
    tall = h > w  # h / w > 1 for positive sizes
    more_h = torch.where(tall, coef * h, (w + coef * w) - h)
    more_w = torch.where(tall, (h + coef * h) - w, coef * w)
    out = torch.stack([x1 - more_w / 2, y1 - more_h / 2, x2 + more_w / 2, y2 + more_h / 2], -1).round().long()
    none = (raw_boxes == -1).all(-1, keepdim=True)
    return torch.where(none, torch.full_like(out, -1), out)


def _axis_grid(start: torch.Tensor, length: torch.Tensor, size: int, extent: int) -> torch.Tensor:
    """Normalised grid_sample coordinates [N, size] that reproduce `interpolate(crop, size, bilinear,
    align_corners=False)` of the crop [start, start + length) of an axis of `extent` pixels (source index
    (i + 0.5) length / size - 0.5, clamped to the crop as interpolate does)."""
    i = torch.arange(size, dtype=torch.float64, device=start.device)
    src = ((i + 0.5) * (length[:, None] / size) - 0.5).clamp(min=0)
    src = torch.minimum(src, (length[:, None] - 1).double()) + start[:, None]
    return (2 * src + 1) / extent - 1


def _work_dtype(images: torch.Tensor) -> torch.dtype:
    """Sampling runs in fp32 (fp64 for fp64 inputs): an fp16 grid would be off by up to 1/4 pixel on 512 px images."""
    return torch.float64 if images.dtype == torch.float64 else torch.float32


def crop_faces(images: torch.Tensor, boxes: torch.Tensor, size: int = 224) -> torch.Tensor:
    """Square face crops, differentiable w.r.t. the images.

    images [N, 3, H, W] in [-1, 1]; boxes [N, 4] integer x1, y1, x2, y2 (may extend past the image; a row of -1 =
    no face) -> [N, 3, size, size] in [-1, 1]: the box region, padded with -1 outside the image, resized with
    bilinear interpolation without antialias (torchvision 0.16 tensor Resize, as the authors). One batched
    `grid_sample` whose sample positions equal those of pad + slice + `F.interpolate` per image. Rows without a box
    are all -1.
    """
    n, c, h, w = images.shape
    b = boxes.to(images.device).long()
    none = (b == -1).all(-1)
    b = torch.where(none[:, None], torch.tensor([0, 0, 1, 1], device=b.device), b)
    gx = _axis_grid(b[:, 0].double(), (b[:, 2] - b[:, 0]).clamp(min=1).double(), size, w)
    gy = _axis_grid(b[:, 1].double(), (b[:, 3] - b[:, 1]).clamp(min=1).double(), size, h)
    work = _work_dtype(images)
    grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), -1).to(work)
    # Sample (x + 1) with zero padding, then shift back: out-of-image = -1 exactly as the padded tensor.
    out = F.grid_sample(images.to(work) + 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1
    out = torch.where(none[:, None, None, None], torch.full_like(out, -1), out)
    return out.to(images.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Alignment
# ----------------------------------------------------------------------------------------------------------------


def similarity_fit(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """Least-squares similarity (rotation, uniform scale, translation; no reflection) mapping src to dst.

    src [N, K, 2], dst [K, 2] or [N, K, 2] -> [N, 2, 3] matrices M with dst ~ M[:, :, :2] @ p + M[:, :, 2]. Closed
    form of min sum ||a R p + t - q||^2 in 2-D (the same optimum as Umeyama / skimage's SimilarityTransform):
    with centred points s, d: a cos = sum(s.d) / sum|s|^2, a sin = sum(s x d) / sum|s|^2. Differentiable.
    """
    dst = dst.to(src).expand_as(src)
    ms, md = src.mean(1, keepdim=True), dst.mean(1, keepdim=True)
    s, d = src - ms, dst - md
    var = (s**2).sum((1, 2))
    ca = (s * d).sum((1, 2)) / var
    sa = (s[..., 0] * d[..., 1] - s[..., 1] * d[..., 0]).sum(1) / var
    lin = torch.stack([torch.stack([ca, -sa], -1), torch.stack([sa, ca], -1)], 1)  # [N, 2, 2]
    t = md[:, 0] - (lin @ ms[:, 0, :, None])[..., 0]
    return torch.cat([lin, t[..., None]], -1)


def template(size: int = ARCFACE_SIZE) -> torch.Tensor:
    """The ArcFace template [5, 2] (float64) for a `size` x `size` aligned face (scaled from 112)."""
    return ARCFACE_TEMPLATE * (size / ARCFACE_SIZE)


def align_faces(images: torch.Tensor, landmarks: torch.Tensor, size: int = ARCFACE_SIZE) -> torch.Tensor:
    """Similarity-aligned faces, differentiable w.r.t. the images (and the landmarks).

    images [N, 3, H, W] in [-1, 1]; landmarks [N, 5, 2] (x, y pixel coordinates, pixel centres at integers; a row of
    all -1 = no face) -> [N, 3, size, size] in [-1, 1]. Output pixel (u, v) samples the image bilinearly at
    M^-1 (u, v), M the least-squares similarity from the landmarks to the template; outside the image is -1 (the
    authors warp the [0, 255] image with zero padding). Same convention as cv2.warpAffine / skimage.warp; kornia's
    `warp_affine(align_corners=False)`, which the authors used, differs from it by about half a pixel.
    """
    n, c, h, w = images.shape
    lm = landmarks.to(images.device).double()
    none = (landmarks == -1).flatten(1).all(1).to(images.device)
    tmpl = template(size).to(lm.device)
    lm = torch.where(none[:, None, None], tmpl.expand_as(lm), lm)  # keeps the fit finite on empty rows
    m = similarity_fit(lm, tmpl)
    lin, t = m[:, :, :2], m[:, :, 2]
    # inverse similarity: p = lin^-1 (q - t); lin = [[a, -b], [b, a]] -> lin^-1 = lin^T / (a^2 + b^2)
    inv = lin.transpose(1, 2) / (lin[:, 0, 0] ** 2 + lin[:, 1, 0] ** 2)[:, None, None]
    u = torch.arange(size, dtype=torch.float64, device=lm.device)
    q = torch.stack(torch.broadcast_tensors(u[None, :], u[:, None]), -1)  # [size, size, 2] (x, y)
    p = torch.einsum("nij,hwj->nhwi", inv, q) - torch.einsum("nij,nj->ni", inv, t)[:, None, None, :]
    scale = torch.tensor([w, h], dtype=torch.float64, device=lm.device)
    work = _work_dtype(images)
    grid = ((2 * p + 1) / scale - 1).to(work)
    out = F.grid_sample(images.to(work) + 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1
    out = torch.where(none[:, None, None, None], torch.full_like(out, -1), out)
    return out.to(images.dtype)


# ----------------------------------------------------------------------------------------------------------------
# The one-call API
# ----------------------------------------------------------------------------------------------------------------


def detect(
    images: torch.Tensor,
    detector: str | FaceDetector = "mtcnn",
    crop_size: int = 224,
    aligned_size: int = ARCFACE_SIZE,
    expansion: float | None = None,
) -> Faces:
    """Detect the largest face of every image, expand its box, crop and align it.

    images [N, 3, H, W] in [-1, 1] on any device -> `Faces`. Detection runs without gradient; `crops` and `aligned`
    carry gradients to `images` when it requires grad. `detector`: a registry name (a shared default instance) or a
    `FaceDetector`; `expansion` overrides the detector's square-expansion coefficient (0.5 for MTCNN).
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"detect expects images [N, 3, H, W] in [-1, 1], got shape {list(images.shape)}")
    det = _default_detector(detector) if isinstance(detector, str) else detector
    with torch.no_grad():
        found, raw, marks, scores = det(images.detach())
    dev = images.device
    found, raw, marks, scores = found.to(dev).bool(), raw.to(dev).float(), marks.to(dev).float(), scores.to(dev).float()
    raw = torch.where(found[:, None], raw, torch.full_like(raw, -1))
    marks = torch.where(found[:, None, None], marks, torch.full_like(marks, -1))
    coef = getattr(det, "expansion", 0.5) if expansion is None else expansion
    boxes = expand_boxes(raw, coef)
    return Faces(
        found=found,
        boxes=boxes,
        raw_boxes=raw,
        landmarks=marks,
        scores=torch.where(found, scores, torch.zeros_like(scores)),
        crops=crop_faces(images, boxes, crop_size),
        aligned=align_faces(images, marks, aligned_size),
    )
