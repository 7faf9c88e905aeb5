"""The toy world's small judges: the attribute classifier (with a validity head) and the image-feature encoder.

Both read 32x32 images in [-1, 1]; other sizes are resized first, so they plug into crops of any size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from common.classifiers import AttributeClassifier, Head
from common.toy.world import ATTRIBUTES, IMAGE_SIZE


def _to_input(x: torch.Tensor) -> torch.Tensor:
    """[N, 3, H, W] -> [N, 3, 32, 32] (bilinear, anti-aliased when shrinking; differentiable)."""
    if x.shape[-2:] == (IMAGE_SIZE, IMAGE_SIZE):
        return x
    shrink = x.shape[-1] > IMAGE_SIZE
    return F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False, antialias=shrink)


class Trunk(nn.Module):
    """Four 3x3 convolutions (32 -> 16 -> 8 -> 4 pixels) and one dense layer: [N, 3, 32, 32] -> [N, width]."""

    def __init__(self, channels=(32, 48, 64, 96), width: int = 128):
        super().__init__()
        layers, c_in = [], 3
        for i, c in enumerate(channels):
            layers += [nn.Conv2d(c_in, c, 3, stride=1 if i == 0 else 2, padding=1), nn.GroupNorm(8, c), nn.SiLU()]
            c_in = c
        self.conv = nn.Sequential(*layers)
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(c_in * 16, width), nn.SiLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x))


HEADS = tuple(
    Head(a, c, tuple(range(o, o + len(c))))
    for a, c, o in zip(ATTRIBUTES, ATTRIBUTES.values(), (0, 2, 6))
)
VALID_LOGIT = 8


class ToyNet(nn.Module):
    """Trunk + one linear layer: [N, 3, 32, 32] -> [N, 9] = [gender 2 | race 4 | age 2 | valid 1] logits."""

    def __init__(self):
        super().__init__()
        self.trunk = Trunk()
        self.out = nn.Linear(128, VALID_LOGIT + 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.trunk(x))


class ToyClassifier(AttributeClassifier):
    """Attribute classifier of the toy world with a validity output.

    `forward(crops [N, 3, S, S] in [-1, 1]) -> {"gender": [N, 2], "race": [N, 4], "age": [N, 2]}` logits in the
    preset class orders (crops of another size are resized to 32); `validity(crops) -> [N]` probability that the crop
    is a valid toy face (not degraded or garbage): it plays the face detector's role.
    """

    def __init__(self):
        super().__init__(ToyNet(), HEADS, input_size=IMAGE_SIZE, name="toy")

    def validity(self, crops: torch.Tensor) -> torch.Tensor:
        """Probability [N] (fp32) that each crop [N, 3, S, S] in [-1, 1] is a valid, undamaged toy face."""
        if crops.shape[-2:] != (self.input_size, self.input_size):  # resized exactly as `forward` does
            crops = F.interpolate(crops, size=(self.input_size,) * 2, mode="bilinear", align_corners=False)
        x = crops.to(next(self.parameters()).dtype)
        return self.nets[0](x)[:, VALID_LOGIT].float().sigmoid()


class ToyImageEncoder(nn.Module):
    """Image features for semantics preservation: [N, 3, H, W] in [-1, 1] -> [N, 128], L2-normalised, differentiable.

    Trained contrastively (see `common.toy.build.train_encoder`): the same scene with other protected attributes and
    the person moved by up to a pixel is a positive; other people and damaged copies of the same picture are
    negatives. So cosine similarity stays high when only hair length, skin tone or hair colour change or the person
    shifts slightly (as CLIP and DINO features tolerate small shifts), and drops for another person, blotches,
    washed-out colour and other artifacts.
    """

    dim = 128

    def __init__(self):
        super().__init__()
        self.trunk = Trunk(width=256)
        self.proj = nn.Linear(256, self.dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.proj(self.trunk(_to_input(images))), dim=-1)
