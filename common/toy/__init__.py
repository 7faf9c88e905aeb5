"""The toy world: a synthetic, deliberately biased world of 32x32 cartoon people with tiny SD-shaped models trained
on CPU, in which the whole method runs in minutes (`make toy`, `make demo`).

- `world`: the seeded world (occupations "{field} {role}", attributes, captions, splits, renderer).
- `build`: trains the models and writes data/toy/ (`python -m common.toy build`).
- `models.load_toy_components`, `judges` (classifier, detector, image encoder): the shipped weights as plug-ins;
  `plugin` registers them (and the `toy:train` / `toy:heldout` prompts) under the name "toy" (common/registry.py).
"""
