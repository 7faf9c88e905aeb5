"""Attribute specifications: class names, target distribution, plotting colours, and the joint class space.

Class orders follow the authors' classifiers: gender 0 = female, 1 = male; race 0 = WMELH (White, Middle Eastern,
Latino-Hispanic), 1 = Black, 2 = Indian, 3 = Asian; age 0 = young, 1 = old.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Attribute:
    """One categorical attribute and its target distribution over `classes` (sums to 1)."""

    name: str
    classes: tuple[str, ...]
    target: tuple[float, ...]
    colors: tuple[str, ...] = field(default=())

    def __post_init__(self):
        if len(self.classes) < 2:
            raise ValueError(f"attribute '{self.name}' needs at least 2 classes, got {list(self.classes)}")
        if len(self.target) != len(self.classes):
            raise ValueError(
                f"attribute '{self.name}': target {list(self.target)} has {len(self.target)} entries, "
                f"expected {len(self.classes)} (one per class {list(self.classes)})"
            )
        if any(t < 0 for t in self.target) or not math.isclose(sum(self.target), 1.0, abs_tol=1e-6):
            raise ValueError(f"attribute '{self.name}': target {list(self.target)} must be non-negative and sum to 1")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def with_target(self, target: Sequence[float] | None) -> Attribute:
        """The same attribute with another target (None keeps the current one)."""
        if target is None:
            return self
        return Attribute(self.name, self.classes, tuple(float(t) for t in target), self.colors)


def uniform(k: int) -> tuple[float, ...]:
    return tuple([1.0 / k] * k)


PRESETS: dict[str, Attribute] = {
    "gender": Attribute("gender", ("female", "male"), uniform(2), ("red", "blue")),
    "race": Attribute("race", ("WMELH", "Black", "Indian", "Asian"), uniform(4), ("limegreen", "black", "brown", "orange")),
    "age": Attribute("age", ("young", "old"), (0.75, 0.25), ("darkorange", "darkgreen")),
}


def preset(name: str, target: Sequence[float] | None = None) -> Attribute:
    """A preset attribute (gender, race, age), optionally with another target distribution."""
    if name not in PRESETS:
        raise KeyError(f"unknown attribute '{name}'; presets are {sorted(PRESETS)}")
    return PRESETS[name].with_target(target)


def joint_space(attrs: Sequence[Attribute]) -> list[tuple[int, ...]]:
    """All joint class tuples in row-major order (last attribute fastest): gender x race -> index 4 g + r."""
    return list(itertools.product(*[range(a.num_classes) for a in attrs]))


def joint_target(attrs: Sequence[Attribute]) -> list[float]:
    """Target probability of each joint cell, attributes independent (product of the marginals)."""
    return [math.prod(a.target[c] for a, c in zip(attrs, cell)) for cell in joint_space(attrs)]
