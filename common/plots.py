"""Figures: annotated image grids in the style of the paper's figures, and per-prompt class-frequency plots.

Annotated tile (one per image), left to right: one bar per attribute, then the image, inside a thin grey frame.
A bar's coloured height is the classifier's confidence (top probability) and its colour the predicted class (male
blue, female red; WMELH limegreen, Black black, Indian brown, Asian orange; young darkorange, old darkgreen); the rest
of the bar is white. The face box is drawn on the image and the image index (the noise index, so original and
debiased grids can be matched) in its corner. An image without a detected face gets light-grey bars and a "no face"
mark: it is never drawn as a class (the authors' evaluation grids coloured undetected images by their meaningless
predictions, docs/method.md#undetected-images-in-grids). Sizes scale with the image side (the authors' 50-px bars, 10-px frame,
4-px box and 100-pt index at 512 px).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageColor, ImageDraw, ImageFont

from common.attributes import PRESETS, Attribute

FONT_FILE = Path(__file__).resolve().parents[1] / "data" / "0-utils" / "arial-bold.ttf"
NO_FACE_BAR = (211, 211, 211)  # lightgray: no class colour uses it
FRAME = (105, 105, 105)  # dimgray, so that the race class "Black" stays distinguishable from the frame
BAR_BACKGROUND = (255, 255, 255)
TEXT_STROKE = (32, 32, 32)  # near-black outline of the white labels; pure black is the race class "Black"
FALLBACK_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive")
DISPLAY_ORDER = {"gender": (1, 0)}
"""class order of the `order="class"` layout where it differs from the class index (the authors put male first)"""


def attribute_colors(attr: Attribute | str, num_classes: int | None = None) -> list[tuple[int, int, int]]:
    """RGB colour of each class of an attribute: the preset's colours, else a fixed categorical palette."""
    if isinstance(attr, str):
        attr = PRESETS.get(attr) or attr
    names: Sequence[str] = attr.colors if isinstance(attr, Attribute) and attr.colors else ()
    k = num_classes if num_classes is not None else (attr.num_classes if isinstance(attr, Attribute) else len(names))
    if len(names) != k:
        import matplotlib.colors as mcolors

        return [tuple(int(round(255 * c)) for c in mcolors.to_rgb(FALLBACK_COLORS[i % len(FALLBACK_COLORS)]))
                for i in range(k)]
    return [ImageColor.getrgb(c)[:3] for c in names]


def _font(size: int):
    """Arial Bold from the authors' data folder when present, else PIL's bundled default font at `size`."""
    if FONT_FILE.is_file():
        return ImageFont.truetype(str(FONT_FILE), size)
    return ImageFont.load_default(size=size)


def tile_geometry(side: int) -> dict[str, int]:
    """Pixel sizes for an image of `side` px: bar width, frame width, box line width, font size (the authors' values
    at 512 px, scaled, with small minimums so 32-px toy images stay readable)."""
    s = side / 512
    return {
        "bar": max(3, round(50 * s)),
        "frame": max(1, round(10 * s)),
        "box": max(1, round(4 * s)),
        "font": max(8, round(100 * s)),
    }


def to_pil(image: torch.Tensor) -> Image.Image:
    """`[3, H, W] in [-1, 1]` -> RGB PIL image, rounded to the nearest uint8 level (the authors truncated); also how
    `common.generate` saves images."""
    x = ((image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return Image.fromarray(x.permute(1, 2, 0).numpy(), "RGB")


def annotated_tile(
    image: torch.Tensor,
    box: Sequence[float] | None,
    probs: Mapping[str, torch.Tensor],
    found: bool,
    attrs: Sequence[Attribute | str],
    index: int | None = None,
    box_color: str | tuple = "black",
) -> Image.Image:
    """One annotated image. `image [3, H, W] in [-1, 1]`; `box` (x1, y1, x2, y2) in image pixels (None / -1s: none);
    `probs[name]`: Tensor[K] class probabilities of that attribute; `found`: a face was detected."""
    img = to_pil(image)
    w, h = img.size
    g = tile_geometry(min(w, h))
    draw = ImageDraw.Draw(img)
    font = _font(g["font"])
    stroke = max(1, g["font"] // 12)
    if found and box is not None and min(float(v) for v in box) >= 0:
        x1, y1, x2, y2 = (float(v) for v in box)
        draw.rectangle([x1, y1, x2, y2], outline=box_color, width=g["box"])
    if not found:
        draw.text((g["box"], g["box"]), "no face", font=_font(max(8, g["font"] // 2)), fill="white",
                  stroke_width=stroke, stroke_fill=TEXT_STROKE, anchor="lt")
    if index is not None:
        draw.text((w - g["box"] - 1, h - g["box"] - 1), str(index), font=font, fill="white", stroke_width=stroke,
                  stroke_fill=TEXT_STROKE, anchor="rd")

    n = len(attrs)
    tile = Image.new("RGB", (2 * g["frame"] + n * g["bar"] + w, 2 * g["frame"] + h), FRAME)
    bars = ImageDraw.Draw(tile)
    for a, attr in enumerate(attrs):
        name = attr.name if isinstance(attr, Attribute) else attr
        x0 = g["frame"] + a * g["bar"]
        rect = [x0, g["frame"], x0 + g["bar"] - 1, g["frame"] + h - 1]
        if not found:
            bars.rectangle(rect, fill=NO_FACE_BAR)
            continue
        p = torch.as_tensor(probs[name]).float().flatten()
        cls = int(p.argmax())
        filled = int(round(float(p[cls]) * h))
        bars.rectangle(rect, fill=BAR_BACKGROUND)
        if filled > 0:
            color = attribute_colors(attr, p.numel())[cls]
            bars.rectangle([x0, g["frame"] + h - filled, x0 + g["bar"] - 1, g["frame"] + h - 1], fill=color)
    tile.paste(img, (g["frame"] + n * g["bar"], g["frame"]))
    return tile


def class_order(probs: Mapping[str, torch.Tensor], found: torch.Tensor, attrs: Sequence[Attribute | str]) -> list[int]:
    """The authors' grid order: by predicted class of each attribute in turn (gender male first, then race 0 -> 3,
    then age young -> old), within a group by confidence descending (the product of the attributes' top
    probabilities), ties by index; images without a face last, by index."""
    names = [a.name if isinstance(a, Attribute) else a for a in attrs]
    n = found.shape[0]
    keys = []
    for i in range(n):
        if not bool(found[i]):
            keys.append((1, (), 0.0, i))
            continue
        classes, conf = [], 1.0
        for name in names:
            p = torch.as_tensor(probs[name][i]).float()
            c = int(p.argmax())
            order = DISPLAY_ORDER.get(name, tuple(range(p.numel())))
            classes.append(order.index(c))
            conf *= float(p[c])
        keys.append((0, tuple(classes), -conf, i))
    return [k[-1] for k in sorted(keys)]


def annotated_grid(
    images: torch.Tensor,
    faces_boxes: torch.Tensor | None,
    probs: Mapping[str, torch.Tensor],
    found: torch.Tensor,
    attrs: Sequence[Attribute | str],
    indices: Sequence[int] | None = None,
    order: str = "index",
    nrow: int | None = None,
    tile_size: int | None = None,
    box_color: str | tuple = "black",
) -> Image.Image:
    """Grid of annotated tiles. `images [N, 3, H, W] in [-1, 1]`; `faces_boxes [N, 4]` (x1, y1, x2, y2 in image
    pixels, -1 rows where none; None: no boxes); `probs[name]: [N, K]`; `found [N] bool`; `indices`: labels (default
    0..N-1). `order`: "index" (as given) or "class" (`class_order`). `nrow`: rows (default floor(sqrt(N)), the
    authors'). `tile_size`: resize the images to this side first (boxes scaled along), to keep 160-image grids small.
    """
    n = images.shape[0]
    if n == 0:
        raise ValueError("annotated_grid needs at least one image")
    found = torch.as_tensor(found).bool()
    for name, p in probs.items():
        if p.shape[0] != n:
            raise ValueError(f"probs['{name}'] has {p.shape[0]} rows, expected {n} (one per image)")
    if found.shape[0] != n or (faces_boxes is not None and faces_boxes.shape[0] != n):
        raise ValueError(f"found / faces_boxes must have {n} rows (one per image)")
    indices = list(range(n)) if indices is None else [int(i) for i in indices]
    boxes = None if faces_boxes is None else faces_boxes.detach().float().cpu().clone()
    if tile_size is not None and tile_size != images.shape[-1]:
        scale = tile_size / images.shape[-1]
        images = torch.nn.functional.interpolate(images.float(), size=(tile_size, tile_size), mode="bilinear",
                                                 antialias=True, align_corners=False)
        if boxes is not None:
            boxes = torch.where(boxes >= 0, boxes * scale, boxes)
    if order == "class":
        perm = class_order(probs, found, attrs)
    elif order == "index":
        perm = list(range(n))
    else:
        raise ValueError(f"order='{order}': expected 'index' or 'class'")
    tiles = [
        annotated_tile(images[i], None if boxes is None else boxes[i].tolist(),
                       {k: v[i] for k, v in probs.items()}, bool(found[i]), attrs, indices[i], box_color)
        for i in perm
    ]
    rows = nrow or max(1, math.isqrt(n))
    cols = math.ceil(n / rows)
    tw, th = tiles[0].size
    grid = Image.new("RGB", (cols * tw, rows * th), "white")
    for k, t in enumerate(tiles):
        grid.paste(t, ((k % cols) * tw, (k // cols) * th))
    return grid


def frequency_plot(
    freq_after,
    target: Sequence[float],
    class_names: Sequence[str],
    colors: Sequence | None = None,
    freq_before=None,
    prompt_labels: Sequence[str] | None = None,
    title: str | None = None,
    labels: tuple[str, str] = ("original", "debiased"),
):
    """Per-prompt class frequencies against the target, one panel per class (the paper's per-occupation figure).

    `freq_after`, `freq_before`: array-likes [P, K] (rows: prompts; NaN where a prompt had no face); `target`: K
    target frequencies drawn as dashed lines; `colors`: K colour names or RGB int tuples (`attribute_colors`).
    Before = hollow markers, after = filled. Returns a matplotlib Figure
    (Agg backend; the caller saves and closes it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    after = np.asarray(freq_after, dtype=np.float64)
    before = None if freq_before is None else np.asarray(freq_before, dtype=np.float64)
    if after.ndim != 2 or after.shape[1] != len(class_names) or len(target) != len(class_names):
        raise ValueError(f"frequency_plot: freq_after {list(after.shape)}, target {len(target)} and class_names "
                         f"{len(class_names)} must agree on K")
    if before is not None and before.shape != after.shape:
        raise ValueError(f"freq_before {list(before.shape)} must match freq_after {list(after.shape)}")
    p, k = after.shape
    palette = list(colors) if colors is not None else [FALLBACK_COLORS[c % len(FALLBACK_COLORS)] for c in range(k)]
    if len(palette) != k:
        raise ValueError(f"frequency_plot: {len(palette)} colours for {k} classes")
    rgb = [tuple(v / 255 for v in c) if isinstance(c, tuple) else c for c in palette]  # PIL RGB ints or colour names
    fig, axes = plt.subplots(k, 1, figsize=(max(6.0, 0.22 * p + 2), 1.6 * k + 1), sharex=True, squeeze=False)
    x = np.arange(p)
    for c, ax in enumerate(axes[:, 0]):
        if before is not None:
            ax.scatter(x, before[:, c], s=22, facecolors="none", edgecolors=[rgb[c]], label=labels[0])
        ax.scatter(x, after[:, c], s=22, color=[rgb[c]], label=labels[1] if before is not None else None)
        ax.axhline(target[c], color="grey", linestyle="--", linewidth=1, label="target")
        ax.set_ylim(-0.03, 1.03)
        ax.set_ylabel(f"freq {class_names[c]}")
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].legend(loc="upper right", fontsize=7, ncol=3)
    ax = axes[-1, 0]
    ax.set_xticks(x)
    ax.set_xticklabels(prompt_labels if prompt_labels is not None else [str(i) for i in x], rotation=90, fontsize=6)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
