"""The toy world's judges, registered by `common.toy.plugin` in the registries of `common.classifiers`,
`common.faces` and `common.features` under the name "toy": attribute classifier (+ validity), face detector,
image-feature encoder.

No toy face-identity encoder is shipped: toy configs set `face_encoder: null` (no face-realism term).
"""

from __future__ import annotations

from pathlib import Path

import torch

from common.toy.models import load_weights
from common.toy.nets import ToyClassifier, ToyImageEncoder


def load_classifier(device="cpu", dtype=torch.float32, path: str | Path | None = None) -> ToyClassifier:
    """The shipped toy attribute classifier (gender, race, age + `validity`), frozen, in eval mode."""
    return load_weights(ToyClassifier(), path, "classifier").to(device=device, dtype=dtype)


def load_image_encoder(device="cpu", dtype=torch.float32, path: str | Path | None = None) -> ToyImageEncoder:
    """The shipped toy image-feature encoder: images [N, 3, H, W] in [-1, 1] -> [N, 128] L2-normalised."""
    return load_weights(ToyImageEncoder(), path, "image_encoder").to(device=device, dtype=dtype)


class ToyDetector:
    """FaceDetector of the toy world: every image is one face whose box is the whole image (expansion 0) and whose
    landmarks are the ArcFace template scaled to the image; `found` = the toy classifier's validity >= `threshold`,
    `scores` = that validity (for every image;
    boxes and landmarks are -1 where not found). Images it rejects (degraded, garbage) get no target, as undetected faces do.

    `__call__(images [N, 3, H, W] in [-1, 1]) -> (found [N] bool, raw_boxes [N, 4], landmarks [N, 5, 2], scores [N])`.
    """

    expansion = 0.0

    def __init__(self, threshold: float = 0.5, classifier: ToyClassifier | None = None, path=None):
        self.threshold = float(threshold)
        self.classifier = classifier
        self.path = path

    @torch.no_grad()
    def __call__(self, images: torch.Tensor):
        from common.faces import WholeImageDetector

        if self.classifier is None:
            self.classifier = load_classifier(path=self.path)
        self.classifier.to(images.device)
        scores = self.classifier.validity(images.float())
        _, raw, marks, _ = WholeImageDetector()(images)
        found = scores >= self.threshold
        raw = torch.where(found[:, None], raw, torch.full_like(raw, -1.0))
        marks = torch.where(found[:, None, None], marks, torch.full_like(marks, -1.0))
        return found, raw, marks, scores
