"""`make bench`: run every benchmark of the project and write one flat JSON of named figures.

Each `scripts/bench_*.py` module exposes `run() -> dict[str, float]`; their figures are merged (names must be unique)
into `outputs/bench/summary.json`. Ratios are measured side by side in one run, on this machine.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import platform
import time
from pathlib import Path

import torch


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="outputs/bench/summary.json")
    ap.add_argument("--only", nargs="*", help="run only these benchmark modules (e.g. alignment dft)")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    here = Path(__file__).parent
    names = sorted(m.name[len("bench_"):] for m in pkgutil.iter_modules([str(here)]) if m.name.startswith("bench_"))
    if args.only:
        names = [n for n in names if n in args.only]
    summary: dict[str, object] = {
        "machine": f"{platform.machine()} {os.cpu_count()} cpu, torch {torch.__version__}",
        "device": "cuda" if torch.cuda.is_available() else "cpu",
    }
    for name in names:
        t0 = time.time()
        print(f"[bench] {name} ...", flush=True)
        figures = importlib.import_module(f"scripts.bench_{name}").run()
        clash = set(figures) & set(summary)
        if clash:
            raise KeyError(f"scripts/bench_{name}.py reports figures already named by another benchmark: {sorted(clash)}")
        summary.update(figures)
        print(f"[bench] {name}: {json.dumps(figures)} ({time.time() - t0:.0f} s)", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"[bench] wrote {out}")


if __name__ == "__main__":
    main()
