"""Grid pixel checks on synthetic examples: bar heights follow the confidences, bar colours the predicted classes,
undetected images carry no class colour; the authors' ordering; the frequency plot renders."""

import numpy as np
import pytest
import torch
from PIL import ImageColor

from common import plots

BLUE, RED = ImageColor.getrgb("blue"), ImageColor.getrgb("red")
LIMEGREEN, ORANGE = ImageColor.getrgb("limegreen"), ImageColor.getrgb("orange")
CLASS_COLORS = [BLUE, RED, LIMEGREEN, ORANGE, ImageColor.getrgb("brown"), (0, 0, 0)]


def _mask(tile: np.ndarray, rgb) -> np.ndarray:
    return np.all(tile == np.array(rgb, dtype=np.uint8), axis=-1)


def _tiles(grid, n):
    """Split a one-row grid into its n equal-width tiles (uint8 [H, W, 3] arrays)."""
    a = np.asarray(grid)
    w = a.shape[1] // n
    assert a.shape[1] == n * w
    return [a[:, i * w : (i + 1) * w] for i in range(n)]


def _coloured_height(tile, rgb):
    """Height of the coloured run in the column of `tile` holding the most pixels of colour `rgb`."""
    return int(_mask(tile, rgb).sum(0).max())


@pytest.mark.parametrize("side", [32, 64])
def test_bar_heights_follow_confidence_and_no_face_has_no_class_colour(side):
    # a flat mid-grey image (value 0.1 -> 140) holds none of the class colours
    images = torch.full((4, 3, side, side), 0.1)
    p_male = torch.tensor([0.9, 0.6, 0.25, 0.99])  # male, male, female (conf 0.75), undetected
    gender = torch.stack([1 - p_male, p_male], 1)
    race = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.05, 0.05, 0.05, 0.85], [0.5, 0.2, 0.2, 0.1], [0.97, 0.01, 0.01, 0.01]])
    found = torch.tensor([True, True, True, False])
    boxes = torch.tensor([[4.0, 4, side - 4, side - 4]] * 3 + [[-1.0, -1, -1, -1]])
    grid = plots.annotated_grid(images, boxes, {"gender": gender, "race": race}, found, ["gender", "race"], nrow=1)
    tiles = _tiles(grid, 4)
    # oracle: coloured height = round(confidence * side), the colour the argmax class's (issue: male blue, female red,
    # WMELH limegreen, Asian orange); the rest of the bar above it is white
    expect = [(BLUE, 0.9, LIMEGREEN, 0.7), (BLUE, 0.6, ORANGE, 0.85), (RED, 0.75, LIMEGREEN, 0.5)]
    for tile, (gc, gp, rc, rp) in zip(tiles, expect):
        assert _coloured_height(tile, gc) == round(gp * side)
        assert _coloured_height(tile, rc) == round(rp * side)
        col = int(np.argmax(_mask(tile, gc).sum(0)))
        column = tile[:, col]
        top = np.flatnonzero(np.all(column == 255, axis=-1))
        assert len(top) == side - round(gp * side)  # white part of the bar
    # the undetected image: not one pixel of any class colour, grey bars instead
    assert not any(_mask(tiles[3], c).any() for c in CLASS_COLORS)
    assert _mask(tiles[3], plots.NO_FACE_BAR).sum() == 2 * plots.tile_geometry(side)["bar"] * side


def test_bar_width_and_box_scale_with_512px_images():
    images = torch.full((1, 3, 512, 512), 0.1)
    grid = plots.annotated_grid(images, torch.tensor([[100.0, 100, 300, 300]]), {"gender": torch.tensor([[0.2, 0.8]])},
                                torch.tensor([True]), ["gender"], indices=[7])
    a = np.asarray(grid)
    blue = _mask(a, BLUE)
    assert blue.sum(1).max() == 50  # the authors' 50-px bar at 512 px
    assert blue.sum(0).max() == round(0.8 * 512)
    # the 4-px black box: inside the image region, rows 100..103 at x = 200 are black
    x0 = 10 + 50  # frame + one bar (tile_geometry at 512)
    assert np.all(a[10 + 100 : 10 + 104, x0 + 200] == 0)


def test_class_order_is_male_first_by_confidence_and_no_face_last():
    p_male = torch.tensor([0.3, 0.95, 0.1, 0.7, 0.99])
    found = torch.tensor([True, True, True, True, False])
    probs = {"gender": torch.stack([1 - p_male, p_male], 1)}
    # males by confidence: 1 (0.95), 3 (0.7); females: 2 (0.9), 0 (0.7); undetected 4 last
    assert plots.class_order(probs, found, ["gender"]) == [1, 3, 2, 0, 4]
    images = torch.full((5, 3, 32, 32), 0.1)
    grid = plots.annotated_grid(images, None, probs, found, ["gender"], order="class", nrow=1)
    tiles = _tiles(grid, 5)
    heights = [(_coloured_height(t, BLUE), _coloured_height(t, RED)) for t in tiles]
    assert heights == [(round(0.95 * 32), 0), (round(0.7 * 32), 0), (0, round(0.9 * 32)), (0, round(0.7 * 32)), (0, 0)]


def test_grid_shape_follows_authors_rows_and_resizes_tiles():
    images = torch.zeros(10, 3, 64, 64)
    probs = {"gender": torch.tensor([[0.5, 0.5]] * 10)}
    grid = plots.annotated_grid(images, None, probs, torch.ones(10, dtype=torch.bool), ["gender"], tile_size=32)
    g = plots.tile_geometry(32)
    tw, th = 2 * g["frame"] + g["bar"] + 32, 2 * g["frame"] + 32
    assert grid.size == (4 * tw, 3 * th)  # floor(sqrt(10)) = 3 rows, ceil(10 / 3) = 4 columns


def test_frequency_plot_draws_every_class(tmp_path):
    before = np.array([[0.9, 0.1], [0.8, 0.2], [np.nan, np.nan]])
    after = np.array([[0.55, 0.45], [0.5, 0.5], [0.4, 0.6]])
    fig = plots.frequency_plot(after, [0.5, 0.5], ["female", "male"], colors=plots.attribute_colors("gender"),
                               freq_before=before, prompt_labels=["a", "b", "c"], title="gender")
    axes = fig.get_axes()
    assert len(axes) == 2
    # each panel: before and after scatter (3 points each) and the target line at 0.5
    for c, ax in enumerate(axes):
        offsets = [coll.get_offsets() for coll in ax.collections]
        np.testing.assert_allclose(np.asarray(offsets[1])[:, 1], after[:, c])
        assert [ln.get_ydata()[0] for ln in ax.get_lines()] == [0.5]
    out = tmp_path / "f.png"
    fig.savefig(out)
    assert out.stat().st_size > 1000
    with pytest.raises(ValueError, match="must agree on K"):
        plots.frequency_plot(after, [1.0], ["female", "male"])
