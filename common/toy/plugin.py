"""The toy world as a plug-in: registers the name "toy" as a model source, a prompt source (`toy:train`,
`toy:heldout`), an attribute classifier, a face detector and an image encoder, all synthetic (CPU-sized).

Imported by `common.registry.load_plugins` (listed in its DEFAULT_PLUGINS and in pyproject.toml's entry points); it
imports nothing heavy itself: the factories are "module:attr" strings, imported when first used.
"""

from __future__ import annotations

from common.registry import registry

NAME = "toy"


def prompts(split: str) -> list[str]:
    """The evaluation prompts of the toy world's `train` or `heldout` occupations."""
    from common.toy.world import ToyWorld

    world = ToyWorld()
    splits = {"train": world.train_occupations, "heldout": world.heldout_occupations}
    if split not in splits:
        raise KeyError(f"the toy world's splits are {sorted(splits)}")
    return [world.prompt(o) for o in splits[split]]


registry("model source").register(NAME, "common.toy.models:load_toy_components", synthetic=True)
registry("prompt source").register(NAME, prompts, synthetic=True)
registry("classifier").register(NAME, "common.toy.judges:load_classifier", synthetic=True)
registry("face detector").register(NAME, "common.toy.judges:ToyDetector", synthetic=True)
registry("image encoder").register(NAME, "common.toy.judges:load_image_encoder", synthetic=True)
