"""Research tools of the toy world, outside the product (not installed with `common`): measurements that informed the
toy configs' settings (docs/toy-world.md). Run from the checkout: `python -m research.toy_probe`, `python -m
research.toy_locality`; their tests: `make research-test`."""
