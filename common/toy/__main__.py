"""`python -m common.toy build [--seed 0] [--out data/toy]` trains and writes the toy world's models;
`python -m common.toy world-sample --out FILE.png` renders a grid of world samples."""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def _summary(m: dict, out: Path) -> str:
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file()) / 2**20
    c, e, b, t = m["classifier"], m["image_encoder"], m["base_bias"], m["timings"]
    lines = [
        f"toy world v{m['world_version']} built in {t['total_seconds'] / 60:.1f} min -> {out} ({size:.1f} MB)",
        "classifier accuracy  real: " + ", ".join(f"{a} {c[f'accuracy_{a}_real']:.3f}" for a in ("gender", "race", "age"))
        + f"; valid {c['valid_rate_real']:.3f}",
        "                    recon: " + ", ".join(f"{a} {c[f'accuracy_{a}_recon']:.3f}" for a in ("gender", "race", "age"))
        + f"; valid {c['valid_rate_recon']:.3f}",
        "degraded rejected:   " + ", ".join(f"{k[9:]} {v:.2f}" for k, v in c.items() if k.startswith("rejected_")),
        f"encoder cosine:      attributes changed {e['cos_attributes_changed']:.3f}, reconstruction "
        f"{e['cos_reconstruction']:.3f}, same occupation {e['cos_same_occupation_other_person']:.3f}, "
        f"blotchy {e['cos_blotchy']:.3f}, washed {e['cos_washed']:.3f}",
        f"{'base-model bias':<20} {'gender':>7} {'race':>7} {'age':>7} {'valid':>7}",
    ]
    for split in ("train", "heldout"):
        r, d = b[split], b[f"data_{split}"]
        lines.append(f"  {split:<9} model   {r['gender_bias']:7.3f} {r['race_bias']:7.3f} {r['age_bias']:7.3f} "
                     f"{r['valid_rate']:7.3f}")
        lines.append(f"  {split:<9} data    {d['gender_bias']:7.3f} {d['race_bias']:7.3f} {d['age_bias']:7.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m common.toy", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="train the toy VAE, text encoder + U-Net, classifier and image encoder")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--out", type=Path, default=None, help="output folder (default data/toy)")
    b.add_argument("--quick", action="store_true", help="seconds-long smoke build (untrained models)")
    b.add_argument("--threads", type=int, default=None,
                   help="torch threads (default 2; 1 avoids OpenMP stalls on a machine shared with other jobs)")
    b.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override a BuildConfig field")
    b.add_argument("--reuse", type=Path, default=None, metavar="DIR",
                   help="take the VAE, classifier and image encoder of the build in DIR (same settings) and train only "
                        "the text encoder + U-Net")
    w = sub.add_parser("world-sample", help="render a grid of world samples to a PNG")
    w.add_argument("--out", type=Path, required=True)
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--n", type=int, default=64)
    w.add_argument("--cols", type=int, default=16)
    w.add_argument("--scale", type=int, default=3)
    sub.add_parser("demo", help="`make demo`: debias gender x race on the toy world, measure before/after "
                                "(python -m common.toy demo --help)", add_help=False)
    if argv is None:
        import sys

        argv = sys.argv[1:]
    if argv and argv[0] == "demo":
        from common.toy.demo import main as demo_main

        demo_main(argv[1:])
        return 0
    a = p.parse_args(argv)

    from common.runtime import UsageError

    if a.cmd == "build":
        from common.toy.build import DEFAULT_OUT, build, config_from_args

        overrides = {}
        for kv in a.set:
            if "=" not in kv:
                raise UsageError(f"--set expects KEY=VALUE, got '{kv}'")
            k, v = kv.split("=", 1)
            overrides[k] = v
        if a.threads is not None:
            overrides["threads"] = a.threads
        cfg = config_from_args(a.seed, a.quick, overrides)  # a bad setting: ConfigError / KeyError, one sentence
        out = a.out or DEFAULT_OUT
        t0 = time.time()
        if a.reuse is not None and not (a.reuse / "manifest.json").is_file():
            raise UsageError(f"--reuse {a.reuse}: no manifest.json there (expected the folder of a previous toy build)")
        try:
            manifest = build(out, cfg, reuse=a.reuse)
        except ValueError as e:  # --reuse of a build with other settings or world version
            raise UsageError(str(e)) from None
        print(_summary(manifest, Path(out)))
        print(f"({time.time() - t0:.0f} s)")
    else:
        import numpy as np
        from PIL import Image

        from common.toy.world import ToyWorld, grid

        world = ToyWorld()
        people = world.sample_people(np.random.default_rng(a.seed), a.n)
        a.out.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(grid(world.render(people), a.cols, scale=a.scale)).save(a.out)
        print(f"wrote {a.out} ({a.n} people of training occupations, seed {a.seed})")
    return 0


if __name__ == "__main__":
    from common.runtime import cli

    cli(main)
