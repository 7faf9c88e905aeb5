"""Image degradations that imitate reward hacking (blotches, washed-out colour, noise, colour shifts, occlusion,
smears), used to harden the toy classifier (a "not a valid face" outcome) and to give the toy feature encoder hard
negatives. All functions take and return float images [N, 3, H, W] in [-1, 1] and draw from a torch.Generator.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

KINDS = ("blotchy", "washed", "noise", "color", "occlude", "blur", "ghost", "scramble")


def _u(g: torch.Generator, n: int, lo: float, hi: float, *shape: int) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, *shape, generator=g)


def _field(g: torch.Generator, n: int, cells: int, size: int) -> torch.Tensor:
    """Smooth random colour field [n, 3, size, size] in [-1, 1] (bilinear up-sampling of a cells x cells grid)."""
    return F.interpolate(torch.rand(n, 3, cells, cells, generator=g) * 2 - 1, size=size, mode="bilinear",
                         align_corners=False)


def degrade(images: torch.Tensor, kinds: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Apply degradation KINDS[kinds[i]] to images[i]: [N, 3, H, W] in [-1, 1] -> same shape, clamped to [-1, 1].

    Strengths are drawn so every result is clearly damaged (the face can no longer be read as rendered).
    """
    x = images.clone()
    n, _, h, w = x.shape
    out = x.clone()
    for k, name in enumerate(KINDS):
        idx = (kinds == k).nonzero().flatten()
        if len(idx) == 0:
            continue
        xi = x[idx]
        m = len(idx)
        if name == "blotchy":  # large low-frequency colour blobs over the picture
            blob = _field(g, m, int(torch.randint(3, 7, (1,), generator=g)), h)
            a = _u(g, m, 0.55, 0.9, 1, 1, 1) * (_field(g, m, 4, h)[:, :1].abs() * 1.5).clamp(0, 1)
            yi = xi * (1 - a) + blob * a
        elif name == "washed":  # low contrast, pushed towards a pale colour
            a = _u(g, m, 0.15, 0.45, 1, 1, 1)
            pale = _u(g, m, 0.4, 1.0, 3, 1, 1)
            yi = xi * a + pale * (1 - a)
        elif name == "noise":
            yi = xi + torch.randn(xi.shape, generator=g) * _u(g, m, 0.35, 0.7, 1, 1, 1)
        elif name == "color":  # channel permutation or inversion: skin and hair leave their colour families
            perm = torch.stack([torch.randperm(3, generator=g) for _ in range(m)])
            same = (perm == torch.arange(3)).all(1)
            perm[same] = torch.tensor([2, 0, 1])
            yi = torch.stack([xi[i, perm[i]] for i in range(m)])
            inv = torch.rand(m, generator=g) < 0.3
            yi[inv] = -xi[inv]
        elif name == "occlude":  # a blob or box over 35-65 % of the face region
            yi = xi.clone()
            for i in range(m):
                bh = int(_u(g, 1, 0.45, 0.8) * h)
                bw = int(_u(g, 1, 0.45, 0.8) * w)
                y0 = int(torch.randint(0, h - bh + 1, (1,), generator=g))
                x0 = int(torch.randint(0, w - bw + 1, (1,), generator=g))
                fill = _field(g, 1, 2, max(bh, bw))[0, :, :bh, :bw]
                yi[i, :, y0 : y0 + bh, x0 : x0 + bw] = fill
        elif name == "blur":  # heavy smear: structure gone
            s = int(torch.randint(2, 4, (1,), generator=g))
            yi = F.interpolate(F.avg_pool2d(xi, 2 * s, 2 * s), size=(h, w), mode="bilinear", align_corners=False)
        elif name == "ghost":  # two people melted into one
            other = x[torch.randint(0, n, (m,), generator=g)].flip(-1)
            a = _u(g, m, 0.35, 0.65, 1, 1, 1)
            yi = xi * a + other * (1 - a)
        else:  # scramble: 8x8 patches shuffled
            p = 8
            patches = F.unfold(xi, p, stride=p)
            perm = torch.randperm(patches.shape[-1], generator=g)
            yi = F.fold(patches[..., perm], (h, w), p, stride=p)
        out[idx] = yi
    return out.clamp(-1, 1)


def random_degrade(images: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Each image gets one uniformly drawn degradation kind: [N, 3, H, W] -> [N, 3, H, W]."""
    kinds = torch.randint(0, len(KINDS), (images.shape[0],), generator=g)
    return degrade(images, kinds, g)


def mild(images: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Harmless variation of a valid image (slight noise, brightness and contrast): [N, 3, H, W] -> same."""
    n = images.shape[0]
    y = images * _u(g, n, 0.9, 1.08, 1, 1, 1) + _u(g, n, -0.06, 0.06, 3, 1, 1)
    y = y + torch.randn(images.shape, generator=g) * _u(g, n, 0.0, 0.04, 1, 1, 1)
    return y.clamp(-1, 1)
