"""`make dryrun`: its GPU flag path and table (what a CPU can check), and a reduced run at true size (one experiment,
one variant) through the experiment's own scripts."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

from scripts import dryrun  # noqa: E402


def test_every_experiment_and_every_real_variant_is_listed():
    """Every debias-*.yaml is a dry-run row: the SD 1.5 ones by default, the SDXL ones with --sdxl."""
    todo = {(e, v) for e in dryrun.EXPERIMENTS for v in dryrun.variants(e, sdxl=True)}
    configs = {(p.parent.parent.name, p.stem.removeprefix("debias-")) for p in ROOT.glob("exp-*/configs/debias-*.yaml")}
    assert todo == configs and len(dryrun.EXPERIMENTS) == 6
    default = {(e, v) for e in dryrun.EXPERIMENTS for v in dryrun.variants(e)}
    assert {v for _, v in default} == {"text-encoder", "unet", "text-encoder-and-unet", "token"}
    assert {v for _, v in todo - default} == {"sdxl-text-encoder", "sdxl-unet"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_flag_without_cuda_is_one_sentence(tmp_path, capsys):
    assert dryrun.main(["--device", "cuda", "--cache", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --device cuda, but torch") and not (tmp_path / "c").exists()


def test_cuda_overrides_keep_the_configs_real_sizes():
    """On GPU only the step counts and the generated image counts shrink; resolution, images per prompt,
    micro-batches, denoising steps and dtypes stay the configs' (so the table answers "does it fit")."""
    gpu, cpu = dryrun.overrides("cuda"), dryrun.overrides("cpu")
    sets = " ".join(gpu["train"])
    for key in ("image_size", "images_per_prompt", "micro_batch", "train_steps", "dtype", "allow_cpu"):
        assert key not in sets
    assert "--cpu" not in gpu["generate"] + gpu["evaluate"]
    assert "sampling.image_size=64" in cpu["train"] and "train.allow_cpu=true" in cpu["train"]


def test_cpu_overrides_ask_for_bf16_only_where_native():
    """bf16 frozen weights on a CPU with native bf16 (the dtype a GPU's `auto` picks); the GPU keeps the configs'."""
    cpu16, cpu32, gpu = dryrun.overrides("cpu", bf16=True), dryrun.overrides("cpu"), dryrun.overrides("cuda", bf16=True)
    assert "model.dtype=bf16" in cpu16["train"] and cpu16["generate"][-2:] == ["--dtype", "bf16"]
    assert "model.dtype=bf16" not in " ".join(cpu32["train"]) and "--dtype" not in cpu32["generate"]
    assert "dtype" not in " ".join(gpu["train"] + gpu["generate"])


def test_bad_jobs_is_one_sentence(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(dryrun, "build_standins", lambda cache: {"params": {}})
    assert dryrun.main(["--jobs", "0", "--cache", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("error: --jobs 0: expected a whole number >= 1")


def test_table_has_the_gpu_columns_on_cuda():
    row = {"config": "exp-3-debias-gender-race", "variant": "unet", "pass": True, "seconds": 100.0, "peak_rss_gb": 9.5,
           "step_seconds": 12.345, "gpu_peak_gb": 61.24,
           "stages": {s: {"seconds": 20.0, "rc": 0, "peak_rss_gb": 9.5} for s in
                      ("train", "resume", "export", "generate", "evaluate")}}
    bad = {**row, "variant": "token", "pass": False, "failed": "resume", "gpu_peak_gb": None,
           "stages": {"train": row["stages"]["train"]}}
    lines = dryrun.table([row, bad], "cuda").splitlines()
    assert lines[0].split(" | ")[-3:] == ["s / train step", "peak GPU GB", "pass |"]
    assert lines[2].endswith("| 12.35 | 61.2 | yes |")
    assert "| 20 | - | - | - | - |" in lines[3] and lines[3].endswith("| - | NO (resume) |")
    assert "peak GPU GB" not in dryrun.table([row], "cpu")


def test_metrics_csv_feeds_step_seconds_and_gpu_peak(tmp_path):
    (tmp_path / "metrics.csv").write_text("step,key,value\n1,seconds,9\n1,gpu_peak_gb,30.5\n2,seconds,4\n"
                                          "2,gpu_peak_gb,31.5\n3,seconds,6\n")
    assert dryrun._metric(tmp_path, "seconds") == [9.0, 4.0, 6.0]
    assert max(dryrun._metric(tmp_path, "gpu_peak_gb")) == 31.5


def test_standin_fill_is_seeded_by_name_and_sane():
    """Same weights whatever the build order (a new clone gets the same stand-ins); fan-in scaled so activations stay
    O(1) through a deep stack, and norms start at one."""
    from torch import nn

    class Block(nn.Module):  # names as in the real models: norm scales are found by "norm" in the name
        def __init__(self):
            super().__init__()
            self.fc1, self.layer_norm, self.fc2 = nn.Linear(512, 512), nn.LayerNorm(512), nn.Linear(512, 512)

    a, b = dryrun._build(Block, "t"), dryrun._build(Block, "t")
    for (k, v), (_, w) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(v, w), k
    assert torch.equal(a.layer_norm.weight, torch.ones(512)) and torch.equal(a.fc1.bias, torch.zeros(512))
    assert abs(float(a.fc1.weight.std()) - 512 ** -0.5) < 0.002
    assert not torch.equal(a.fc1.weight, a.fc2.weight)  # seeded by name, not one stream reused
    with pytest.raises(RuntimeError, match="persistent buffers"):
        dryrun._build(nn.BatchNorm1d, "bn", 4)


@pytest.mark.slow
def test_reduced_dryrun_at_true_size_through_the_scripts(tmp_path):
    """exp-1's text-encoder variant: SD 1.5 / CLIP ViT-H/14 / DINOv2-B / data.zip stand-ins at their real sizes, train
    2 steps, resume to 3, export, generate, evaluate, through the experiment's own shell scripts."""
    out = tmp_path / "summary.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "scripts.dryrun", "--only", "exp-1-debias-gender:text-encoder",
                           "--no-reproduce", "--work", str(tmp_path / "runs"), "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    from common.models import cpu_supports_bf16

    assert res["cpu_bf16"] == cpu_supports_bf16() and res["jobs"] == 1  # one config: all cores to it
    p = res["standins"]["params"]
    assert (p["sd15/text_encoder"], p["sd15/unet"], p["sd15/vae"]) == (123060480, 859520964, 83653863)
    assert p["clip-vit-h-14/vision"] == 630766080 and p["dinov2-base"] == 86580480
    (row,) = res["rows"]
    assert row["pass"] and list(row["stages"]) == ["train", "resume", "export", "generate", "evaluate"]
    run = tmp_path / "runs" / "exp-1-debias-gender" / "text-encoder"
    state = json.loads((run / "ckpts" / "checkpoint-3" / "state.json").read_text())
    assert state["step"] == 3
    info = json.loads((run / "export" / "adapter_info.json").read_text())
    # the config's rank-50 LoRA on all 12 CLIP ViT-L layers: (q, k, v, out, fc1, fc2) x (A, B) = 144 tensors
    assert info["text_encoder"]["rank"] == 50 and info["text_encoder"]["tensors"] == 12 * 6 * 2
    assert list((run / "wandb").glob("offline-run-*"))  # the config's own backend, offline without credentials
