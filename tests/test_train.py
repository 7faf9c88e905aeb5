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
from train_helpers import tiny_overrides

from common.config import load_config
from common.train import Trainer, latest_checkpoint

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
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1",
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
    # validation: the bias of both processes' 2 x 4 images per prompt, the same on each process
    assert res["val_matches_gathered"] and res["val_n_images"] == 8
    assert res["val_same_on_both"][0] == res["val_same_on_both"][1]
    assert len(res["val_gender"]) > 1 or res["val_gender"][0] < 1, res["val_gender"]  # the judge is not one-class
    # the logged loss is the mean over both processes (it was rank 0's alone), the same on each
    for logged, local in zip(res["loss_logged"], res["loss_local"]):
        assert local[0] != local[1]  # different noise per process: the reduction is visible
        assert logged[0] == pytest.approx(logged[1], abs=1e-12)
        assert logged[0] == pytest.approx((local[0] + local[1]) / 2, rel=1e-9)


class _ColourNet(torch.nn.Module):
    """Female logit = 20 * mean(red - blue), male logit = 4: a judge that calls (almost) every image male, and whose
    verdict any colour shift of the whole image can move."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(20.0))

    def forward(self, x):
        return torch.stack([self.scale * (x[:, 0] - x[:, 2]).mean((1, 2)), torch.full_like(x[:, 0, 0, 0], 4.0)], -1)


def _biased_classifier(device="cpu", dtype=torch.float32, **_):
    from common.classifiers import AttributeClassifier, Head

    clf = AttributeClassifier(_ColourNet(), [Head("gender", ("female", "male"), (0, 1))], input_size=64, name="test-biased")
    return clf.to(device=device, dtype=dtype).eval().requires_grad_(False)


def test_alignment_signal_reaches_the_parameters(tmp_path):
    """A classifier that calls (almost) everyone male: the 50/50 targets ask for half female. 20 steps on one fixed
    prompt must lower the alignment loss, which only happens if its gradient reaches the LoRA through the chain."""
    from common.classifiers import register_classifier

    register_classifier("test-biased", _biased_classifier)
    (tmp_path / "p.txt").write_text("a photo of the face of a nurse, a person\n")
    cfg = load_config(ROOT / "exp-1-debias-gender/configs/debias-text-encoder-and-unet.yaml", tiny_overrides(
        tmp_path / "run", "judges.classifier=test-biased", "judges.features=[]", "loss.w_img=0", "loss.w_face=0",
        f"prompts.train=[{tmp_path / 'p.txt'}:train]", f"prompts.val=[{tmp_path / 'p.txt'}:val]",
        "train.images_per_prompt=8", "train.micro_batch=8", "train.lr=0.05", "sampling.train_steps=[3, 3]",
        "finetune.rank=4", "train.checkpoint_every=0"))
    tr = Trainer(cfg)
    losses = [tr.step()["loss_align_gender"] for _ in range(20)]
    assert all(torch.isfinite(torch.tensor(losses)))
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < 0.7 * first, losses


def test_validation_reports_the_original_model_once(tmp_path):
    """Before any step the LoRA's B matrices are zero, so the finetuned, EMA and original models are the same function:
    their validation biases must be equal (the original used to be summed once per variant, i.e. doubled)."""
    cfg = load_config(BASE, tiny_overrides(tmp_path, "finetune.rank=4", "train.val_images_per_prompt=4"))
    tr = Trainer(cfg)
    out = tr.validate()
    for a in ("gender", "race"):
        assert out[f"val_orig_bias_{a}"] == pytest.approx(out[f"val_main_bias_{a}"], abs=1e-12)
        assert out[f"val_orig_bias_{a}"] == pytest.approx(out[f"val_ema_bias_{a}"], abs=1e-12)
        per_prompt = [v for k, v in out.items() if k.startswith(f"val_orig_bias_{a}_p")]
        assert len(per_prompt) == 2 and out[f"val_orig_bias_{a}"] == pytest.approx(sum(per_prompt) / 2, abs=1e-12)


def test_logs_and_validation_measure_age_against_its_target(tmp_path):
    """exp-4's age target is 75/25: the step logs and validation report `gap_age` (mean |f - target|), computed by
    `metrics.distance_to_target`, and no `bias_age`, which would call an on-target batch biased. Oracle for the
    value: each prompt's figure recomputed by hand from the original images' predicted ages."""
    cfg = load_config(ROOT / "exp-4-debias-gender-race-age/configs/debias-text-encoder.yaml",
                      tiny_overrides(tmp_path, "finetune.rank=4", "train.val_images_per_prompt=4"))
    tr = Trainer(cfg)
    logs = tr.step()
    assert "gap_age" in logs and "bias_age" not in logs and "bias_gender" in logs and "bias_race" in logs
    assert 0 <= logs["gap_age"] <= 0.75
    ages: dict[int, torch.Tensor] = {}
    out = tr.validate(on_batch=lambda tag, i, images, j: ages.setdefault(i, j.pred["age"]) if tag == "orig" else None)
    assert not any("bias_age" in k for k in out)
    per_prompt = [v for k, v in out.items() if k.startswith("val_orig_gap_age_p")]
    assert len(per_prompt) == 2 and out["val_orig_gap_age"] == pytest.approx(sum(per_prompt) / 2, abs=1e-12)
    for i, v in enumerate(per_prompt):
        pred = ages[i]
        old = float((pred == 1).sum() / (pred >= 0).sum())
        assert v == pytest.approx((abs((1 - old) - 0.75) + abs(old - 0.25)) / 2, abs=1e-6)


def test_kept_attribute_enters_the_loss_with_its_weight(tmp_path):
    """loss.keep=[age] while debiasing gender x race: the same first step at w_keep 0 and 2 differs in loss by exactly
    2 x the logged keep term (the rollouts are identical: same seed, same initial weights), and since a fresh LoRA
    is zero every finetuned image reads as its original (kept_age = 1). confidence_threshold 0 gives every original
    with a face a kept target, so the term is not zero. Tolerance 1e-5: float32 sums in another order."""
    out = {}
    for w in (0.0, 2.0):
        cfg = load_config(BASE, tiny_overrides(tmp_path / str(w), "finetune.rank=4", "loss.keep=[age]",
                                               f"loss.w_keep={w}", "loss.confidence_threshold=0"))
        out[w] = Trainer(cfg).step()
    assert out[2.0]["loss_keep_age"] == pytest.approx(out[0.0]["loss_keep_age"], rel=1e-6) and out[0.0]["loss_keep_age"] > 0
    assert out[2.0]["loss"] - out[0.0]["loss"] == pytest.approx(2 * out[0.0]["loss_keep_age"], rel=1e-5, abs=1e-6)
    assert out[0.0]["kept_age"] == 1.0 and "bias_age" not in out[0.0] and "gap_age" not in out[0.0]


def test_dft_last_k_reaches_the_backward(tmp_path):
    """sampling.dft_last_k is what the trainer back-propagates through: with 2 sampling steps, last_k = 2 is the whole
    chain, so one step leaves exactly the parameters of last_k = null (same seed, same rollouts); last_k = 1 does not."""
    params = {}
    for k in ("null", "2", "1"):
        cfg = load_config(BASE, tiny_overrides(tmp_path / k, "finetune.rank=4", "sampling.train_steps=[2, 2]",
                                               f"sampling.dft_last_k={k}"))
        tr = Trainer(cfg)
        tr.step()
        params[k] = torch.cat([p.detach().flatten() for p in tr.params.values()])
    assert torch.allclose(params["2"], params["null"], rtol=1e-5, atol=1e-7)  # float32 sums in another order
    assert not torch.allclose(params["1"], params["null"], rtol=1e-3, atol=1e-6)


def test_marginal_alignment_solves_one_problem_per_attribute(tmp_path):
    """loss.joint_alignment=false: each attribute's targets come from its own transport problem, so they equal
    `expected_targets` + `assign` on that attribute alone (oracle: the alignment module called directly)."""
    from common.alignment import assign, expected_targets

    cfg = load_config(BASE, tiny_overrides(tmp_path, "finetune.rank=4", "loss.joint_alignment=false",
                                           "train.images_per_prompt=6", "train.micro_batch=6"))
    tr = Trainer(cfg)
    g = torch.Generator().manual_seed(0)
    probs = {"gender": torch.softmax(3 * torch.randn(6, 2, generator=g), -1),
             "race": torch.softmax(3 * torch.randn(6, 4, generator=g), -1)}
    targets, confidence, _ = tr.targets_for(probs, step=3)
    for a, k in (("gender", 2), ("race", 4)):
        q = expected_targets({a: probs[a].double()}, {a: [1.0 / k] * k})[a]
        t, c = assign(q, cfg.loss.confidence_threshold)
        assert torch.equal(targets[a], t) and torch.allclose(confidence[a], c)
    # and the joint problem differs on this batch (otherwise the option would be untested)
    cfg.loss.joint_alignment = True
    joint, _, _ = tr.targets_for(probs, step=3)
    assert any(not torch.equal(joint[a], targets[a]) for a in ("gender", "race"))


def test_prompts_per_step_averages_the_single_prompt_gradients(tmp_path):
    """train.prompts_per_step=2: the step's gradient is the mean of what two one-prompt steps compute, each on its own
    prompt and noise (oracle: two P=1 trainers from the same initialisation, the second fed the second prompt's noise).
    Gender only, so the binary alignment is exact and no Monte Carlo seed enters. Tolerance 1e-6 relative: the same
    float32 operations, only summed in another order."""
    (tmp_path / "p.txt").write_text("a photo of the face of a nurse, a person\na photo of the face of a pilot, a person\n")
    cfg_file = ROOT / "exp-1-debias-gender/configs/debias-text-encoder.yaml"
    sets = [f"prompts.train=[{tmp_path / 'p.txt'}:train]", f"prompts.val=[{tmp_path / 'p.txt'}:val]",
            "finetune.rank=4", "train.images_per_prompt=4", "train.micro_batch=4", "train.checkpoint_every=0"]

    def grads_of_first_step(tr):
        seen = {}

        def record(*a, **k):
            seen.update({n: p.grad.detach().clone() for n, p in tr.params.items()})

        tr.opt.step = record
        tr.step()
        return seen

    both = Trainer(load_config(cfg_file, tiny_overrides(tmp_path / "both", *sets, "train.prompts_per_step=2")))
    prompts = [p for p in both.train_prompts]
    from common.train import prompt_for_step

    order = [prompt_for_step(prompts, both.cfg.train.seed, k) for k in (0, 1)]
    g_both = grads_of_first_step(both)
    singles = []
    for j, prompt in enumerate(order):
        tr = Trainer(load_config(cfg_file, tiny_overrides(tmp_path / f"one{j}", *sets)))
        tr.train_prompts = [prompt]
        own_noise = tr.noise
        tr.noise = lambda tag, n, offset=0, j=j, own=own_noise: own("train" if j == 0 else f"train/{j}", n, offset)
        singles.append(grads_of_first_step(tr))
    assert order[0] != order[1]
    moved = 0
    for name, g in g_both.items():
        expect = (singles[0][name] + singles[1][name]) / 2
        assert torch.allclose(g, expect, rtol=1e-6, atol=1e-9 * float(expect.abs().max()) + 1e-12), name
        moved += int(not torch.allclose(singles[0][name], singles[1][name], rtol=1e-3, atol=0))
    assert moved > 0  # the two prompts' gradients differ, so the mean is not trivially either one


def test_lr_schedules_by_hand():
    """lr_at against hand values: cosine is lr at step 0, lr/2 half-way, lr (2 + sqrt 2)/4 a quarter in and 0 at the
    end; linear is lr (1 - t); constant is lr throughout (the paper)."""
    from types import SimpleNamespace

    from common.train import lr_at

    def at(schedule, step):
        return lr_at(SimpleNamespace(lr=2e-3, max_steps=400, lr_schedule=schedule), step)

    assert [at("constant", s) for s in (0, 200, 400)] == [2e-3] * 3
    assert at("cosine", 0) == pytest.approx(2e-3, abs=1e-15)
    assert at("cosine", 100) == pytest.approx(2e-3 * (2 + 2**0.5) / 4, rel=1e-12)
    assert at("cosine", 200) == pytest.approx(1e-3, rel=1e-12)
    assert at("cosine", 400) == pytest.approx(0.0, abs=1e-15)
    assert at("linear", 100) == pytest.approx(1.5e-3, rel=1e-12) and at("linear", 400) == 0.0


def test_trainer_applies_the_lr_schedule(tmp_path):
    """The optimizer steps with lr_at(step): the logged lr and the param group's lr after step k follow the schedule."""
    from common.train import lr_at

    cfg = load_config(BASE, tiny_overrides(tmp_path, "finetune.rank=4", "train.lr_schedule=linear", "train.max_steps=4",
                                           "train.lr=0.01", "train.checkpoint_every=0"))
    tr = Trainer(cfg)
    for k in range(3):
        logs = tr.step()
        assert logs["lr"] == pytest.approx(0.01 * (1 - k / 4), rel=1e-12)
        assert tr.opt.param_groups[0]["lr"] == pytest.approx(lr_at(cfg.train, k), rel=1e-12)
