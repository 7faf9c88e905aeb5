"""The training engine on tiny components: every shipped config runs; exact resume; the alignment signal reaches the
parameters; two CPU processes agree (targets, parameters, NaN skipping)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from common.config import load_config
from common.train import Trainer, latest_checkpoint
from train_helpers import tiny_overrides

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted(p for p in ROOT.glob("exp-*/configs/*.yaml") if p.name.startswith(("debias-", "toy")))
BASE = ROOT / "exp-3-debias-gender-race/configs/debias-text-encoder.yaml"


def run(config, out, *extra, resume=None, steps=None):
    cfg = load_config(config, tiny_overrides(out, "finetune.rank=4", *extra))
    tr = Trainer(cfg, resume=resume)
    if steps is not None:
        cfg.train.max_steps = steps
    tr.fit()
    return tr


@pytest.mark.slow
@pytest.mark.parametrize("config", SHIPPED, ids=lambda p: f"{p.parts[-3][:5]}/{p.stem}")
def test_every_shipped_config_runs_two_steps(config, tmp_path):
    tr = run(config, tmp_path)
    assert tr.step_count == 2
    ck = latest_checkpoint(tmp_path)
    assert ck is not None and ck.name == "checkpoint-2"
    sd = load_file(str(ck / "trainable.safetensors"))
    assert set(sd) == set(tr.params) and all(torch.isfinite(v).all() for v in sd.values())
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    assert rows[0] == "step,key,value" and any(r.startswith("2,loss,") for r in rows)


def test_resume_reproduces_uninterrupted_run(tmp_path):
    """Stop after step 2, resume, reach step 4: adapters equal the uninterrupted run's bit for bit (CPU, fp32)."""
    full = run(BASE, tmp_path / "a", "train.max_steps=4")
    part = run(BASE, tmp_path / "b", "train.max_steps=2")
    assert part.step_count == 2
    resumed = run(BASE, tmp_path / "b", "train.max_steps=4", resume="latest")
    assert resumed.step_count == 4
    for k, v in full.params.items():
        assert torch.equal(v, resumed.params[k]), k
    for k, v in full.ema.shadow.items():
        assert torch.equal(v, resumed.ema.shadow[k]), k
    # rolling checkpoints: only the last `keep_checkpoints` (2) survive
    assert sorted(p.name for p in (tmp_path / "a/ckpts").iterdir()) == ["checkpoint-4", "checkpoint_tmp-2", "checkpoint_tmp-3"]


@pytest.mark.slow
def test_two_processes_agree(tmp_path):
    """accelerate launch --multi_gpu with 2 CPU processes (gloo), as environment.md describes."""
    out = tmp_path / "res.json"
    env = dict(os.environ, ACCELERATE_USE_CPU="true", FAIR_DIFFUSION_TEST_NAN="1:1", OMP_NUM_THREADS="1",
               PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517",
           str(ROOT / "tests/dist_worker.py"), str(out), str(tmp_path / "run"), str(BASE)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(out.read_text())
    assert res["world"] == 2
    assert res["targets_equal"]
    assert res["identical"] == [True, True, True]
    assert res["skipped"] == [0.0, 1.0, 0.0]  # the NaN on rank 1 at step 1 skipped the step on both processes
    assert res["changed"][1] == [0.0, 0.0] and res["changed"][0] == [1.0, 1.0]
