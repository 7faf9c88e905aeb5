"""One training step of the engine on tiny components (exp-3 gender x race, text-encoder + U-Net LoRA, 8 images,
20 denoising steps, 64 px): seconds per step and peak memory with the fast and the reference adjusted-DFT gradient.

Each form runs in a fresh subprocess (so peak RSS is its own); 1 warm-up step, then the median of 3 timed steps.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "exp-3-debias-gender-race/configs/debias-text-encoder-and-unet.yaml"

WORKER = r"""
import json, resource, statistics, sys, tempfile, time
sys.path.insert(0, sys.argv[2]); sys.path.insert(0, sys.argv[2] + "/tests")
import torch
torch.set_num_threads(1)
from common.config import load_config
from common.train import Trainer
from train_helpers import tiny_overrides
out = tempfile.mkdtemp()
cfg = load_config(sys.argv[3], tiny_overrides(out, "finetune.rank=8", "train.images_per_prompt=8", "train.micro_batch=8",
                  "sampling.train_steps=[20, 20]", "train.max_steps=100", "sampling.dft=" + sys.argv[1],
                  "judges.classifier=random-fairface8"))
tr = Trainer(cfg)
tr.step()
times = []
for _ in range(3):
    t = time.perf_counter(); tr.step(); times.append(time.perf_counter() - t)
print(json.dumps({"s": statistics.median(times), "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def _run(mode: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    p = subprocess.run([sys.executable, "-c", WORKER, mode, str(ROOT), str(CONFIG)], capture_output=True, text=True,
                       env=env, timeout=900)
    if p.returncode:
        raise RuntimeError(f"bench_train worker ({mode}) failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def run() -> dict[str, float]:
    fast, ref = _run("fast"), _run("reference")
    return {
        "train_step_s_fast": round(fast["s"], 3),
        "train_step_s_reference": round(ref["s"], 3),
        "train_step_speedup": round(ref["s"] / fast["s"], 3),
        "train_peak_rss_mib_fast": round(fast["rss_mib"], 1),
        "train_peak_rss_mib_reference": round(ref["rss_mib"], 1),
    }


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
