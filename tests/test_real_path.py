"""The paths a real user takes in the first hour: logging backends, wandb credentials, the default model id, the CPU
refusal, one data-path rule, chunked decoding, the diffusers notice, and one-sentence CLI errors (exit code 2)."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_helpers import tiny_overrides

ROOT = Path(__file__).resolve().parents[1]
EXP1 = ROOT / "exp-1-debias-gender/configs"
TOY_EXPS = sorted(p.parent.parent.name for p in ROOT.glob("exp-*/configs/toy.yaml"))


def run(cmd, env=None, cwd=ROOT, timeout=600):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", **(env or {})}
    env = {k: v for k, v in env.items() if v is not None}  # None removes a variable
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def py(*args, **kw):
    return run([sys.executable, *args], **kw)


# ----------------------------------------------------------------------------------------------------------------
# Logging backends, through `python -m common.train`
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["tensorboard", "wandb", "csv"])
def test_every_logging_backend_trains_and_writes_its_files(backend, tmp_path):
    """The config default (tensorboard) crashed with `requires a logging_dir`; wandb runs offline without credentials
    and must leave an offline run; csv writes metrics.csv only."""
    home = tmp_path / "home"
    home.mkdir()
    env = {"HOME": str(home), "WANDB_API_KEY": None, "NETRC": str(home / "none"), "WANDB_SILENT": "true",
           "WANDB_MODE": None}  # no credentials and no mode: the trainer must choose offline itself
    run_dir = tmp_path / "run"
    sets = [a for o in tiny_overrides(run_dir, f"logging.backend={backend}", "train.max_steps=1", "finetune.rank=4")
            for a in ("--set", o)]
    proc = py("-m", "common.train", "--config", str(EXP1 / "debias-text-encoder.yaml"), *sets, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = (run_dir / "metrics.csv").read_text().splitlines()
    assert rows[0] == "step,key,value" and any(r.startswith("1,loss,") for r in rows)
    events = list((run_dir / "logs").rglob("events.out.tfevents.*")) if (run_dir / "logs").exists() else []
    offline = list((run_dir / "wandb").glob("offline-run-*")) if (run_dir / "wandb").exists() else []
    if backend == "tensorboard":
        assert events, "no tensorboard event file under RUN_DIR/logs"
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        scalars = set()
        for f in events:
            acc = EventAccumulator(str(f))
            acc.Reload()
            scalars |= set(acc.Tags()["scalars"])
        assert "loss" in scalars
    elif backend == "wandb":
        assert offline, f"no offline wandb run under {run_dir / 'wandb'}: {proc.stdout[-2000:]}"
        assert "logging offline" in proc.stdout
    else:
        assert not events and not offline


def test_wandb_credentials_from_login_netrc_or_environment(tmp_path, monkeypatch):
    """`wandb login` writes a netrc entry for api.wandb.ai: that counts as credentials, as WANDB_API_KEY does."""
    from common.train import wandb_credentials

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("NETRC", raising=False)
    assert not wandb_credentials()
    (tmp_path / ".netrc").write_text("machine example.org\n  login user\n  password x\n")
    assert not wandb_credentials()
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "a" * 40 + "\n")
    (tmp_path / ".netrc").chmod(0o600)
    assert wandb_credentials()
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.mycompany.com")
    assert not wandb_credentials()  # a private server needs its own entry
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert wandb_credentials()


# ----------------------------------------------------------------------------------------------------------------
# Defaults, device, data paths
# ----------------------------------------------------------------------------------------------------------------


def test_default_model_is_the_maintained_hub_copy():
    """runwayml/stable-diffusion-v1-5 was removed from the hub; every default names the maintained copy."""
    from common.config import Config
    from common.generate import build_parser as gen_parser
    from common.reproduce import build_parser as rep_parser

    maintained = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert Config().model.name == maintained
    assert gen_parser().parse_args(["--prompts", "x", "--out", "o"]).model == maintained
    assert rep_parser().parse_args(["--experiment", "exp-1", "--lora", "x"]).model == maintained
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    stale = [f for f in tracked if f.endswith((".py", ".md", ".yaml", ".sh")) and f != "tests/test_real_path.py"
             and "runwayml" in (ROOT / f).read_text(errors="replace")]
    assert not stale, stale


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without usable CUDA")
def test_real_config_without_cuda_stops_before_loading_anything(tmp_path):
    """A real config on a machine with no usable CUDA used to train silently on the CPU. Now: one sentence naming what
    was found and the key that allows it, exit 2, nothing loaded (the default hub id is not even looked up)."""
    proc = py("-m", "common.train", "--config", str(EXP1 / "debias-text-encoder.yaml"),
              "--set", f"paths.output_dir={tmp_path / 'run'}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr.strip()
    assert err.startswith("error: model 'stable-diffusion-v1-5/stable-diffusion-v1-5' would run on the CPU")
    assert "train.allow_cpu" in err and "Traceback" not in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()
    # generate / reproduce: the same rule, allowed by --cpu
    proc = py("-m", "common.generate", "--prompts", "occupation.json:test", "--out", str(tmp_path / "g"))
    assert proc.returncode == 2 and "--cpu" in proc.stderr and "Traceback" not in proc.stderr


def test_require_device_rule(monkeypatch):
    from common.runtime import DeviceError, require_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert require_device("toy", False, "x") == "cpu"
    assert require_device("tiny:3", False, "x") == "cpu"
    assert require_device("some/model", True, "x") == "cpu"
    assert require_device("some/model", False, "x", device="cpu") == "cpu"  # an explicit --device cpu is a request
    with pytest.raises(DeviceError, match="would run on the CPU.*pass --cpu"):
        require_device("some/model", False, "pass --cpu")
    with pytest.raises(DeviceError, match="device 'cuda' was asked for"):
        require_device("toy", False, "x", device="cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert require_device("some/model", False, "x") == "cuda"


def test_data_paths_resolve_against_the_data_folder_not_the_working_directory(tmp_path, monkeypatch):
    from common.classifiers import LAYOUTS, load_classifier, mobilenet
    from common.config import data_path, data_root
    from common.features import FaceBank
    from common.prompts import load_prompts

    data = tmp_path / "data"
    (data / "1-prompts").mkdir(parents=True)
    (data / "1-prompts" / "mine.json").write_text(json.dumps({"test_prompts": ["a photo of a judge"]}))
    bank = data / "3-face-features/X/face_feats.pkl"
    bank.parent.mkdir(parents=True)
    torch.save({"feats": torch.eye(3)}, bank.with_suffix(".pt"))
    f = data / LAYOUTS["fairface6"].default_file
    f.parent.mkdir(parents=True)
    torch.save(mobilenet(6).state_dict(), f)
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.delenv("FAIR_DIFFUSION_DATA", raising=False)
    assert data_root() == ROOT / "data"  # the repository's data/, whatever the working directory
    monkeypatch.setenv("FAIR_DIFFUSION_DATA", str(data))
    assert data_root() == data
    assert load_prompts("mine.json:test") == ["a photo of a judge"]
    assert len(FaceBank.load(data_path("3-face-features/X/face_feats.pt"))) == 3
    assert load_classifier("fairface6").attributes == {"gender": ("female", "male"),
                                                      "race": ("WMELH", "Black", "Indian", "Asian")}
    assert data_root("other") == ROOT / "other" and data_root(tmp_path) == tmp_path  # paths.data_dir wins
    with pytest.raises(FileNotFoundError) as e:
        load_classifier("celeba80")
    msg = str(e.value)
    assert str(data / LAYOUTS["celeba80"].default_file) in msg and f"data.zip entry {LAYOUTS['celeba80'].default_file}" in msg
    with pytest.raises(FileNotFoundError, match=r"tried .*1-prompts/nope.json.*data.zip entry 1-prompts/nope.json"):
        load_prompts("nope.json:test")


def test_trainer_reads_the_face_bank_from_the_data_folder(tmp_path, monkeypatch):
    """base.yaml names banks relative to the data folder; a training started from any directory finds them."""
    import shutil

    from common.config import load_config
    from common.train import Trainer

    data = tmp_path / "data"
    (data / "banks").mkdir(parents=True)
    torch.save(torch.randn(5, 512), data / "banks" / "b.pt")
    shutil.copytree(ROOT / "data" / "prompts", data / "prompts")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(EXP1 / "debias-text-encoder.yaml", tiny_overrides(
        tmp_path / "run", "finetune.rank=4", f"paths.data_dir={data}", "judges.face_bank=banks/b.pt",
        "judges.face_encoder=facenet-random"))
    tr = Trainer(cfg)
    assert len(tr.judges.face_bank) == 5


# ----------------------------------------------------------------------------------------------------------------
# Memory: the rollout's decode in chunks
# ----------------------------------------------------------------------------------------------------------------


def test_rollout_decodes_in_chunks_with_the_same_images(make_tiny):
    """Tolerance 1e-5: the VAE decodes each image independently; only the batch size of the convolutions differs."""
    from common.sampling import sample

    comps = make_tiny(seed=0)
    noise = torch.randn(5, *comps.latent_shape(64), generator=torch.Generator().manual_seed(0))
    sizes = []
    h = comps.vae.decoder.register_forward_pre_hook(lambda m, a: sizes.append(a[0].shape[0]))
    try:
        whole = sample(comps, ["a photo of a nurse"] * 5, noise, 2).images
        assert sizes == [5]
        sizes.clear()
        chunked = sample(comps, ["a photo of a nurse"] * 5, noise, 2, decode_chunk=2).images
    finally:
        h.remove()
    assert sizes == [2, 2, 1]
    assert torch.allclose(whole, chunked, atol=1e-5)


def test_trainer_rollout_uses_the_configured_decode_chunk(tmp_path):
    from common.config import load_config
    from common.train import Trainer

    cfg = load_config(EXP1 / "debias-text-encoder.yaml",
                      tiny_overrides(tmp_path / "run", "finetune.rank=4", "sampling.decode_chunk=3"))
    tr = Trainer(cfg)
    sizes = []
    h = tr.comps.vae.decoder.register_forward_pre_hook(lambda m, a: sizes.append(a[0].shape[0]))
    try:
        tr.step()
    finally:
        h.remove()
    assert sizes and max(sizes) <= 3  # the shared rollout of 2 x 4 images, and the with-gradient decode
    with pytest.raises(Exception, match="decode_chunk must be >= 1"):
        load_config(EXP1 / "debias-text-encoder.yaml", ["sampling.decode_chunk=0"])


def test_optimizer_state_is_mapped_to_the_process_device(tmp_path, monkeypatch):
    """Resuming on GPU k must not put rank 0's saved tensors on cuda:0: torch.load gets map_location=the device."""
    from common.config import load_config
    from common.train import Trainer

    cfg = load_config(EXP1 / "debias-text-encoder.yaml", tiny_overrides(tmp_path / "run", "finetune.rank=4",
                                                                         "train.max_steps=1"))
    tr = Trainer(cfg)
    tr.fit()
    seen = []
    real = torch.load

    def spy(f, *a, **kw):
        seen.append((Path(f).name, kw.get("map_location")))
        return real(f, *a, **kw)

    monkeypatch.setattr(torch, "load", spy)
    tr2 = Trainer(cfg, resume="latest")
    assert tr2.step_count == 1
    assert ("optimizer.pt", tr2.device) in seen


def test_diffusers_float32_notice_is_silenced():
    """diffusers warns on every `.to(dtype)` of a model with NO fp32 modules ([]); the project drops exactly that."""
    from common.models import tiny_components
    from common.runtime import _VacuousFp32Notice

    records = []

    class Grab(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    logger = logging.getLogger("diffusers.models.modeling_utils")
    grab = Grab()
    logger.addHandler(grab)
    try:
        comps = tiny_components()  # installs the filter
        comps.unet.to(torch.float16)
        assert not any("kept in float32" in m for m in records)
        filters = [f for f in logger.filters if isinstance(f, _VacuousFp32Notice)]
        assert filters
        for f in filters:
            logger.removeFilter(f)
        comps.unet.to(torch.float32)  # without the filter diffusers prints it: the test above can fail
        assert any("should be kept in float32: []" in m for m in records)
    finally:
        for f in filters:
            logger.addFilter(f)
        logger.removeHandler(grab)


# ----------------------------------------------------------------------------------------------------------------
# One-sentence errors, exit code 2
# ----------------------------------------------------------------------------------------------------------------


def _cli(module, argv, capsys):
    import importlib

    from common.runtime import cli

    mod = importlib.import_module(module)
    with pytest.raises(SystemExit) as e:
        cli(mod.main, argv)
    err = capsys.readouterr().err.strip()
    return e.value.code, err


@pytest.mark.parametrize("module,argv,expect", [
    ("common.train", ["--config", "missing.yaml"], "config file not found"),
    ("common.train", ["--config", str(EXP1 / "debias-text-encoder.yaml"), "--set", "train.lrr=1"],
     "unknown key 'train.lrr' (did you mean 'lr'?)"),
    ("common.train", ["--config", str(EXP1 / "debias-text-encoder.yaml"), "--set", "train.lr=fast"],
     "train.lr = 'fast': expected float"),
    ("common.train", ["--config", str(EXP1 / "debias-text-encoder.yaml"), "--set", "logging.backend=tb"],
     "logging.backend = 'tb': expected one of"),
    ("common.generate", ["--model", "tiny", "--prompts", "nope.json:test", "--out", "{tmp}/g"],
     "prompt file 'nope.json' not found"),
    ("common.generate", ["--model", "tiny", "--prompts", "occupation.json:test", "--lora", "{tmp}/none", "--out", "{tmp}/g",
                         "--limit-prompts", "1", "--images-per-prompt", "1"], "{tmp}/none"),
    ("common.evaluate", ["--images", "{tmp}/none", "--out", "{tmp}/e", "--classifier", "toy", "--detector", "toy"],
     "{tmp}/none"),
    ("common.evaluate", ["--images", "{tmp}/bad", "--out", "{tmp}/e", "--classifier", "toy", "--detector", "toy"],
     "no images found"),
    ("common.export", ["--run", "{tmp}/none", "--out", "{tmp}/x"], "{tmp}/none"),
    ("common.export", ["--from-released", "{tmp}/bad/unet_lora_EMA.pth", "--model", "tiny", "--out", "{tmp}/x"],
     "cannot be read as a weights-only torch.save file"),
    ("common.reproduce", ["--experiment", "exp-1", "--model", "tiny"], "no debiased weights"),
    ("common.reproduce", ["--experiment", "exp-1", "--variant", "prefix", "--model", "tiny", "--lora", "x"],
     "--variant prefix: exp-1 has the variants"),
    ("common.classifiers", ["train", "--dataset", "fairface", "--root", "{tmp}/none", "--out", "{tmp}/c"], "{tmp}/none"),
    ("common.toy.__main__", ["build", "--out", "{tmp}/t", "--set", "encoder_move=-1"], "encoder_move"),
])
def test_cli_errors_are_one_sentence_and_exit_2(module, argv, expect, tmp_path, capsys):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "unet_lora_EMA.pth").write_bytes(b"not a zip")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    code, err = _cli(module, argv, capsys)
    assert code == 2, err
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert expect.replace("{tmp}", str(tmp_path)) in err, err


@pytest.mark.parametrize("module", ["common.train", "common.generate", "common.evaluate", "common.export",
                                    "common.reproduce", "common.classifiers", "common.toy"])
def test_every_tool_main_module_reports_errors_in_one_line(module, tmp_path):
    """`python -m <tool>` itself (its __main__ wiring), with a missing file or folder."""
    argv = {
        "common.train": ["--config", str(tmp_path / "none.yaml")],
        "common.generate": ["--model", "tiny", "--prompts", str(tmp_path / "none.txt"), "--out", str(tmp_path / "o")],
        "common.evaluate": ["--images", str(tmp_path / "none"), "--out", str(tmp_path / "o"), "--classifier", "toy",
                            "--detector", "toy"],
        "common.export": ["--run", str(tmp_path / "none"), "--out", str(tmp_path / "o")],
        "common.reproduce": ["--experiment", "exp-1", "--model", "tiny", "--lora", str(tmp_path / "x"),
                             "--prompts", str(tmp_path / "none.txt"), "--out", str(tmp_path / "o")],
        "common.classifiers": ["train", "--dataset", "celeba", "--root", str(tmp_path / "none"), "--out",
                               str(tmp_path / "o")],
        "common.toy": ["demo", "--config", str(tmp_path / "none.yaml"), "--out", str(tmp_path / "o")],
    }[module]
    proc = py("-m", module, *argv)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert err and err[-1].startswith("error: ") and str(tmp_path / "none") in err[-1], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_experiment_script_rejects_an_unknown_variant_and_a_bad_config(tmp_path):
    proc = run(["bash", str(ROOT / "exp-1-debias-gender/train.sh"), "lora"])
    assert proc.returncode == 2 and "debias-lora.yaml does not exist; variants here:" in proc.stderr
    assert "text-encoder" in proc.stderr and "toy" in proc.stderr


# ----------------------------------------------------------------------------------------------------------------
# Every experiment's toy variant through its own generate.sh / evaluate.sh
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("exp", TOY_EXPS)
def test_toy_variant_generates_and_evaluates_through_the_experiment_scripts(exp, tmp_path):
    """The experiment README's third and fourth commands on the toy world. evaluate.sh used to load CLIP ViT-H from
    the hub whatever the config's judges were; now it uses the config's judges (toy ones here, offline)."""
    from common import adapters as ad
    from common.models import load_components

    out = tmp_path / "run"
    comps = load_components("toy")
    ad.add_lora(comps, True, False, 4)  # an exported adapter (random LoRA) as export.sh writes it
    ad.save_lora(comps, out / "export")
    env = {"OUTPUT_DIR": str(out), "PYTHON": sys.executable}
    proc = run(["bash", str(ROOT / exp / "generate.sh"), "toy", "--limit-prompts", "1", "--images-per-prompt", "3"],
               env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for kind in ("original", "debiased"):
        m = json.loads((out / "images" / kind / "manifest.json").read_text())
        assert m["complete"] and m["steps"] == 15  # the toy config's sampling.test_steps, not the CLI default 30
    proc = run(["bash", str(ROOT / exp / "evaluate.sh"), "toy", "--n-boot", "10"], env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = (out / "eval" / "summary.md").read_text()
    assert "| toy |" in summary  # the config's image encoder judged the pairs


def test_tf32_is_enabled_by_train_and_generate(tmp_path):
    """TF32 was never enabled: fp32 matmuls (LoRA maths, fp32 configs) ran without tensor cores on Ampere+."""
    from common.config import load_config
    from common.generate import main as generate_main
    from common.train import Trainer

    for flip in (lambda: Trainer(load_config(EXP1 / "debias-text-encoder.yaml",
                                             tiny_overrides(tmp_path / "run", "finetune.rank=4"))),
                 lambda: generate_main(["--model", "tiny", "--prompts", "occupation.json:test", "--limit-prompts", "1",
                                        "--images-per-prompt", "1", "--steps", "1", "--out", str(tmp_path / "g")])):
        saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        try:
            flip()
            assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_static_loss_scale_leaves_the_update_unchanged_and_an_overflow_skips(tmp_path):
    """The surrogate is multiplied by S and the fp32 gradients divided by S before the all-reduce: in fp32 (no
    underflow to rescue) the step equals the unscaled one (tolerance 1e-6 relative: one multiply and one divide by a
    power of two are exact; the rest is summation order); the logged loss is unscaled; an overflow skips the step."""
    from common.config import load_config
    from common.train import Trainer

    def one_step(scale):
        cfg = load_config(EXP1 / "debias-text-encoder.yaml", tiny_overrides(
            tmp_path / f"run{scale}", "finetune.rank=4", f"train.loss_scale={scale}"))
        tr = Trainer(cfg)
        before = {k: p.detach().clone() for k, p in tr.params.items()}
        logs = tr.step()
        grads = torch.cat([p.grad.reshape(-1) for p in tr.params.values()])
        moved = any(not torch.equal(before[k], p) for k, p in tr.params.items())
        return logs, grads, moved

    l1, g1, m1 = one_step(1.0)
    l2, g2, m2 = one_step(1024.0)
    assert m1 and m2 and l1["skipped"] == l2["skipped"] == 0.0
    assert torch.allclose(g1, g2, rtol=1e-6, atol=1e-12)
    assert l2["loss"] == pytest.approx(l1["loss"], rel=1e-6)
    l3, _, m3 = one_step(1e300)  # the scaled surrogate overflows fp32
    assert l3["skipped"] == 1.0 and not m3


def test_auto_dtype_is_bf16_where_supported(monkeypatch, capsys):
    from common.models import resolve_dtype

    assert resolve_dtype("auto", "cpu") == resolve_dtype("fp16", "cpu") == torch.float32  # the CPU runs fp32 ...
    import common.models as cm

    monkeypatch.setattr(cm, "cpu_supports_bf16", lambda: True)  # ... unless bf16 is asked for and native
    assert resolve_dtype("bf16", "cpu") == torch.bfloat16 and resolve_dtype("auto", "cpu") == torch.float32
    monkeypatch.setattr(cm, "cpu_supports_bf16", lambda: False)
    capsys.readouterr()
    assert resolve_dtype("bf16", "cpu") == torch.float32  # ... and the fallback is said, not silent
    assert "bf16 on this CPU: running in fp32 instead" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_dtype("auto", "cuda") == torch.bfloat16 and resolve_dtype(None, "cuda") == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_dtype("auto", "cuda") == torch.float16
    assert resolve_dtype("fp16", "cuda") == torch.float16
