"""The real path at full size, without downloading anything: `make dryrun` (CPU) / `make dryrun DEVICE=cuda`.

1. Builds seeded random-weight stand-ins of every external model AT ITS TRUE ARCHITECTURE AND SIZE, in the on-disk
   form the real one comes in, once, in a cache folder outside git (`--cache`, default
   ~/.cache/fair-diffusion/dryrun-v2):
   - hub/ : a Hugging Face hub cache holding `stable-diffusion-v1-5/stable-diffusion-v1-5` (diffusers folder: CLIP
     ViT-L/14 text encoder, SD 1.5 U-Net, VAE, tokenizer, scheduler), `laion/CLIP-ViT-H-14-laion2B-s32B-b79K` (vision
     tower + projection) and `facebook/dinov2-base`, so the configs' own hub ids load offline;
   - data/: the data.zip layout: the six MobileNetV3-Large classifier files, the SFNet-20 OpenSphere folder with its
     config.yml, both face_feats.pkl banks, and 1-prompts/ (the project's prompt files in the data.zip place).
2. Runs, for every experiment and every real variant, the experiment's own shell scripts with only resolution / step
   / image-count overrides: train 2 steps, resume to 3, export, generate, evaluate; then `common.reproduce` on one.
3. Prints one table (config, variant, seconds per stage, peak memory, pass) and writes it as JSON (`--out`).

On CPU: 64 px, one image per prompt, one denoising step, and the frozen weights in bf16 where the CPU has native bf16
(`common.models.cpu_supports_bf16`: 2-3x faster than fp32 there, and the dtype `model.dtype: auto` picks on a GPU);
two configs run side by side (`--jobs`, default 2 on the CPU: a process spends much of its time in single-threaded
loading, so two overlap well on 2 cores). With `--device cuda`: 512 px, the configs' images per prompt,
micro-batches, denoising steps and dtypes; each row adds the seconds per training step and the peak GPU memory
(`torch.cuda.max_memory_allocated`, logged by the trainer as `gpu_peak_gb`).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VERSION = "v2"
SEED = 20261202
SD15_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SDXL_ID = "stabilityai/stable-diffusion-xl-base-1.0"
CLIP_ID = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
DINO_ID = "facebook/dinov2-base"
BANKS = ("3-face-features/CelebA_MobileNetLarge_08240859/face_feats.pkl",
         "3-face-features/FairFace_MobileNetLarge_GenderRace4_09041634/face_feats.pkl")
EXPERIMENTS = sorted(p.name for p in REPO.glob("exp-*") if p.is_dir())


def default_cache() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "fair-diffusion" / f"dryrun-{VERSION}"


def variants(exp: str, sdxl: bool = False) -> list[str]:
    """The real variants of an experiment: its configs/debias-*.yaml (the toy world is not a real variant); the SDXL
    ones (debias-sdxl-*.yaml) only with `sdxl`: their stand-in is built and run on request (`--sdxl`)."""
    names = sorted(p.stem.removeprefix("debias-") for p in (REPO / exp / "configs").glob("debias-*.yaml"))
    return [v for v in names if sdxl or not is_sdxl(v)]


def is_sdxl(variant: str) -> bool:
    return variant.startswith("sdxl-")


# ----------------------------------------------------------------------------------------------------------------
# Stand-ins
# ----------------------------------------------------------------------------------------------------------------


def _seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "little") & (2**63 - 1)


def _fill(model, tag: str) -> None:
    """Seeded weights by parameter name (independent of build order): fan-in scaled normals for matrices and
    kernels, zeros for biases, ones for 1-D norm scales, N(0, 0.02) for other vectors (class tokens, ...)."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            g = torch.Generator().manual_seed(_seed(SEED, tag, name))
            if name.endswith("bias"):
                p.zero_()
            elif p.ndim == 1:
                p.fill_(1.0) if "norm" in name else p.normal_(0, 0.02, generator=g)
            else:
                fan_in = max(1, p[0].numel()) if p.ndim > 1 else 1
                std = min(0.02, fan_in ** -0.5) if "embed" in name else fan_in ** -0.5
                p.copy_(torch.randn(p.shape, generator=g) * std)


def _build(cls, tag: str, *args, **kwargs):
    """Instantiate on the meta device (no slow default init), materialise, fill seeded; every state-dict entry must
    be a parameter (a persistent buffer would be left uninitialised)."""
    import torch

    with torch.device("meta"):
        model = cls(*args, **kwargs)
    model = model.to_empty(device="cpu")
    params = {n for n, _ in model.named_parameters()}
    buffers = [k for k in model.state_dict() if k not in params]
    if buffers:
        raise RuntimeError(f"{cls.__name__} has persistent buffers {buffers[:3]}: the meta-device build cannot fill them")
    _fill(model, tag)
    return model


def _hub_snapshot(hub: Path, repo_id: str) -> Path:
    """A hub-cache snapshot folder for `repo_id` (refs/main -> a fixed fake commit), as huggingface_hub lays it out."""
    commit = hashlib.sha1(f"{repo_id}/{VERSION}".encode()).hexdigest()
    root = hub / f"models--{repo_id.replace('/', '--')}"
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    snap = root / "snapshots" / commit
    snap.mkdir(parents=True, exist_ok=True)
    return snap


def _sd15(snap: Path) -> dict:
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from common.models import CLIP_TOKENS, clip_tokenizer

    counts = {}
    te_cfg = CLIPTextConfig(**CLIP_TOKENS, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                            num_attention_heads=12, projection_dim=768, hidden_act="quick_gelu")
    te = _build(CLIPTextModel, "sd15/text_encoder", te_cfg)
    counts["text_encoder"] = sum(p.numel() for p in te.parameters())
    te.to(torch.float16).save_pretrained(snap / "text_encoder")
    del te
    unet = _build(UNet2DConditionModel, "sd15/unet", sample_size=64, cross_attention_dim=768, attention_head_dim=8)
    counts["unet"] = sum(p.numel() for p in unet.parameters())
    unet.to(torch.float16).save_pretrained(snap / "unet")
    del unet
    vae = _build(AutoencoderKL, "sd15/vae", in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                 up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                 latent_channels=4, sample_size=512, scaling_factor=0.18215)
    counts["vae"] = sum(p.numel() for p in vae.parameters())
    vae.to(torch.float16).save_pretrained(snap / "vae")
    del vae
    clip_tokenizer().save_pretrained(snap / "tokenizer")
    (snap / "scheduler").mkdir(exist_ok=True)
    (snap / "scheduler" / "scheduler_config.json").write_text(json.dumps({
        "_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
        "clip_sample": False}, indent=1))
    (snap / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.6.0",
        "feature_extractor": [None, None], "safety_checker": [None, None], "requires_safety_checker": False,
        "scheduler": ["diffusers", "PNDMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"]}, indent=1))
    return counts


def _sdxl(snap: Path) -> dict:
    """stabilityai/stable-diffusion-xl-base-1.0 as its diffusers folder: CLIP ViT-L (text_encoder), OpenCLIP ViT-bigG
    with projection (text_encoder_2), the 2.6 B U-Net (text_time micro-conditioning), the SDXL VAE; bf16 files."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from common.models import CLIP_TOKENS, clip_tokenizer, sdxl_tokenizer_2

    counts = {}
    parts = {
        "text_encoder": lambda: _build(CLIPTextModel, "sdxl/text_encoder", CLIPTextConfig(
            **CLIP_TOKENS, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            projection_dim=768, hidden_act="quick_gelu")),
        "text_encoder_2": lambda: _build(CLIPTextModelWithProjection, "sdxl/text_encoder_2", CLIPTextConfig(
            **CLIP_TOKENS, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
            projection_dim=1280, hidden_act="gelu")),
        "unet": lambda: _build(UNet2DConditionModel, "sdxl/unet", sample_size=128, layers_per_block=2,
                               down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                               up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                               block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10),
                               attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
                               addition_embed_type="text_time", addition_time_embed_dim=256,
                               projection_class_embeddings_input_dim=2816),
        "vae": lambda: _build(AutoencoderKL, "sdxl/vae", in_channels=3, out_channels=3,
                              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                              block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                              sample_size=1024, scaling_factor=0.13025, force_upcast=True),
    }
    for name, make in parts.items():
        m = make()
        counts[name] = sum(p.numel() for p in m.parameters())
        m.to(torch.bfloat16).save_pretrained(snap / name)
        del m
    clip_tokenizer().save_pretrained(snap / "tokenizer")
    sdxl_tokenizer_2().save_pretrained(snap / "tokenizer_2")
    (snap / "scheduler").mkdir(exist_ok=True)
    (snap / "scheduler" / "scheduler_config.json").write_text(json.dumps({
        "_class_name": "EulerDiscreteScheduler", "beta_start": 0.00085, "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "steps_offset": 1,
        "timestep_spacing": "leading", "prediction_type": "epsilon"}, indent=1))
    (snap / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionXLPipeline", "_diffusers_version": "0.19.0", "force_zeros_for_empty_prompt": True,
        "scheduler": ["diffusers", "EulerDiscreteScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"]}, indent=1))
    return counts


def build_sdxl_standin(cache: Path) -> dict:
    """The SDXL stand-in in the same hub cache, built on request (about 3.5 B more parameters); its counts."""
    stamp = cache / "sdxl-manifest.json"
    if stamp.is_file():
        return json.loads(stamp.read_text())
    t0 = time.time()
    print("[dryrun] building the full-size SDXL stand-in (once)", flush=True)
    counts = {f"sdxl/{k}": v for k, v in _sdxl(_hub_snapshot(cache / "hub", SDXL_ID)).items()}
    out = {"params": counts, "build_seconds": round(time.time() - t0, 1)}
    stamp.write_text(json.dumps(out, indent=1))
    return out


def _clip_h(snap: Path) -> dict:
    """The laion repository holds the whole CLIP model (both towers; `projection_dim` repeated in each sub-config, as
    there): the vision tower + projection is what the image encoder reads, the text tower what CLIP-T needs."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    from common.models import CLIP_TOKENS

    cfg = CLIPConfig(
        text_config=dict(**CLIP_TOKENS, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                         num_attention_heads=16, hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=1024),
        vision_config=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                           patch_size=14, image_size=224, hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=1024),
        projection_dim=1024)
    m = _build(CLIPModel, "clip-h", cfg)
    n = {"clip-vit-h-14/vision": sum(p.numel() for p in m.vision_model.parameters()),
         "clip-vit-h-14/text": sum(p.numel() for p in m.text_model.parameters()),
         "clip-vit-h-14/all": sum(p.numel() for p in m.parameters())}
    m.to(torch.float16).save_pretrained(snap)
    return n


def _dino(snap: Path) -> int:
    import torch
    from transformers import Dinov2Config, Dinov2Model

    cfg = Dinov2Config(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, patch_size=14, image_size=518,
                       layerscale_value=1.0)
    m = _build(Dinov2Model, "dinov2-b", cfg)
    n = sum(p.numel() for p in m.parameters())
    m.to(torch.float32).save_pretrained(snap)
    return n


def _data(data: Path) -> dict:
    """The data.zip files: classifier state dicts, the OpenSphere folder, face banks, prompts."""
    import pickle

    import numpy as np
    import torch

    from common.classifiers import LAYOUTS, mobilenet
    from common.features import SFNET20_FILE, SFNet20

    counts = {}
    for name, lay in LAYOUTS.items():
        torch.manual_seed(_seed(SEED, "classifier", name))
        net = mobilenet(lay.num_logits)
        f = data / lay.default_file
        f.parent.mkdir(parents=True, exist_ok=True)
        torch.save(net.state_dict(), f)
        counts[name] = sum(p.numel() for p in net.parameters())
    torch.manual_seed(_seed(SEED, "sfnet20"))
    net = SFNet20()
    f = data / SFNET20_FILE
    f.parent.mkdir(parents=True, exist_ok=True)
    torch.save({f"module.{k}": v for k, v in net.state_dict().items()}, f)
    (f.parent.parent / "config.yml").write_text(
        "model:\n  backbone:\n    net:\n      type: sfnet20_deprecated\n      in_channel: 3\n      out_channel: 512\n")
    counts["sfnet20"] = sum(p.numel() for p in net.parameters())
    rng = np.random.default_rng(SEED)
    for bank in BANKS:
        feats = rng.standard_normal((2048, 512)).astype(np.float32)
        feats /= np.linalg.norm(feats, axis=1, keepdims=True)
        (data / bank).parent.mkdir(parents=True, exist_ok=True)
        with open(data / bank, "wb") as fh:
            pickle.dump((feats, np.zeros(len(feats), dtype=np.int64)), fh)
    shutil.copytree(REPO / "data" / "prompts", data / "1-prompts", dirs_exist_ok=True)
    return counts


def build_standins(cache: Path) -> dict:
    """Build (or reuse) every stand-in under `cache`; returns the manifest (parameter counts, build seconds)."""
    from common.runtime import quiet_libraries

    quiet_libraries()
    stamp = cache / "manifest.json"
    if stamp.is_file():
        return json.loads(stamp.read_text())
    t0 = time.time()
    tmp = cache.with_name(cache.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    hub = tmp / "hub"
    print(f"[dryrun] building full-size random-weight stand-ins in {cache} (once)", flush=True)
    manifest = {"version": VERSION, "seed": SEED, "params": {}}
    manifest["params"].update({f"sd15/{k}": v for k, v in _sd15(_hub_snapshot(hub, SD15_ID)).items()})
    manifest["params"].update(_clip_h(_hub_snapshot(hub, CLIP_ID)))
    manifest["params"]["dinov2-base"] = _dino(_hub_snapshot(hub, DINO_ID))
    manifest["params"].update(_data(tmp / "data"))
    manifest["build_seconds"] = round(time.time() - t0, 1)
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    shutil.rmtree(cache, ignore_errors=True)
    tmp.rename(cache)
    print(f"[dryrun] stand-ins built in {manifest['build_seconds']} s", flush=True)
    return manifest


# ----------------------------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------------------------


def measured(cmd: list[str], env: dict, log: Path) -> dict:
    """Run `cmd` through a fresh wrapper process that reports its children's peak RSS (so the figure is this stage's
    alone); returns {seconds, rc, peak_rss_gb}. Output goes to `log`."""
    wrapper = ("import json, resource, subprocess, sys\n"
               "rc = subprocess.call(sys.argv[2:], stdout=open(sys.argv[1], 'ab'), stderr=subprocess.STDOUT)\n"
               "print(json.dumps({'rc': rc, 'kb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))")
    t0 = time.time()
    out = subprocess.run([sys.executable, "-c", wrapper, str(log), *cmd], env=env, capture_output=True, text=True,
                         cwd=REPO)
    seconds = time.time() - t0
    try:
        info = json.loads(out.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        info = {"rc": out.returncode or 1, "kb": 0}
    return {"seconds": round(seconds, 1), "rc": info["rc"], "peak_rss_gb": round(info["kb"] / 2**20, 2)}


def overrides(device: str, bf16: bool = False) -> dict[str, list[str]]:
    """Extra arguments per stage: only resolution / step / image-count settings (and, on the CPU, its permission and
    bf16 weights where `bf16`)."""
    if device == "cpu":
        half = (["--set", "model.dtype=bf16"], ["--dtype", "bf16"]) if bf16 else ([], [])
        train = [*half[0], "--set", "sampling.image_size=64", "--set", "train.images_per_prompt=1",
                 "--set", "train.micro_batch=1",
                 "--set", "sampling.train_steps=[1,1]", "--set", "sampling.val_steps=1",
                 "--set", "train.val_images_per_prompt=1", "--set", "prompts.val_limit=1",
                 "--set", "train.validate_every=2", "--set", "train.allow_cpu=true"]
        gen = ["--image-size", "64", "--steps", "1", "--images-per-prompt", "1", "--limit-prompts", "1", "--cpu",
               "--batch-size", "1", *half[1]]
        ev = ["--cpu", "--n-boot", "10", "--batch-size", "2"]
    else:
        train = ["--set", "train.validate_every=0"]
        gen = ["--images-per-prompt", "4", "--limit-prompts", "1"]
        ev = ["--n-boot", "100"]
    return {"train": train, "generate": gen, "evaluate": ev}


def _metric(run: Path, key: str) -> list[float]:
    f = run / "metrics.csv"
    if not f.is_file():
        return []
    with f.open() as fh:
        return [float(r["value"]) for r in csv.DictReader(fh) if r["key"] == key]


def run_config(exp: str, variant: str, device: str, work: Path, env: dict, bf16: bool = False) -> dict:
    """train 2 steps -> resume to 3 -> export -> generate -> evaluate through the experiment's shell scripts."""
    out = work / exp / variant
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    env = {**env, "OUTPUT_DIR": str(out)}
    ov = overrides(device, bf16)
    sh = lambda action: ["bash", str(REPO / exp / f"{action}.sh"), variant]  # noqa: E731
    stages = [
        ("train", sh("train") + ov["train"] + ["--set", "train.max_steps=2"]),
        ("resume", sh("train") + ov["train"] + ["--set", "train.max_steps=3", "--resume", "latest"]),
        ("export", sh("export")),
        ("generate", sh("generate") + ov["generate"]),
        ("evaluate", sh("evaluate") + ov["evaluate"]),
    ]
    row = {"config": exp, "variant": variant, "stages": {}, "pass": True}
    for name, cmd in stages:
        r = measured(cmd, env, out / "dryrun.log")
        row["stages"][name] = r
        print(f"[dryrun] {exp} {variant} {name}: {r['seconds']} s, rc {r['rc']}, peak RSS {r['peak_rss_gb']} GB",
              flush=True)
        if r["rc"] != 0:
            row["pass"], row["failed"] = False, name
            row["log_tail"] = (out / "dryrun.log").read_text(errors="replace")[-3000:]
            break
    if row["pass"]:
        row["pass"] = _check_outputs(out, row)
    row["seconds"] = round(sum(s["seconds"] for s in row["stages"].values()), 1)
    row["peak_rss_gb"] = max(s["peak_rss_gb"] for s in row["stages"].values())
    step_s = _metric(out, "seconds")
    row["step_seconds"] = round(sum(step_s[1:]) / len(step_s[1:]), 2) if len(step_s) > 1 else None
    gpu = _metric(out, "gpu_peak_gb")
    row["gpu_peak_gb"] = round(max(gpu), 2) if gpu else None
    return row


def _check_outputs(out: Path, row: dict) -> bool:
    """What each stage must leave behind: checkpoints 2 and 3, the export, both image sets, the report."""
    need = [out / "ckpts" / "checkpoint-2", out / "ckpts" / "checkpoint-3", out / "export" / "adapter_info.json",
            out / "images" / "original" / "manifest.json", out / "images" / "debiased" / "manifest.json",
            out / "eval" / "summary.md"]
    missing = [str(p.relative_to(out)) for p in need if not p.exists()]
    if missing:
        row["failed"] = f"missing outputs: {', '.join(missing)}"
    return not missing


def run_reproduce(exp: str, variant: str, device: str, work: Path, env: dict, bf16: bool = False) -> dict:
    """`common.reproduce` on an exported run of `exp` (its --lora), at the dry run's sizes."""
    short = exp.split("-debias")[0]
    lora = work / exp / variant / "export"
    out = work / "reproduce"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    sizes = (["--image-size", "64", "--steps", "1", "--images-per-prompt", "1", "--cpu", "--n-boot", "10",
              *(["--dtype", "bf16"] if bf16 else [])] if device == "cpu" else ["--images-per-prompt", "4"])
    cmd = [sys.executable, "-m", "common.reproduce", "--experiment", short, "--variant", variant, "--lora", str(lora),
           "--out", str(out), "--limit-prompts", "1", *sizes]
    r = measured(cmd, env, out / "dryrun.log")
    ok = r["rc"] == 0 and (out / "reproduce.md").is_file()
    row = {"config": f"{short} reproduce", "variant": variant, "stages": {"reproduce": r}, "pass": ok,
           "seconds": r["seconds"], "peak_rss_gb": r["peak_rss_gb"], "step_seconds": None, "gpu_peak_gb": None}
    if not ok:
        row["failed"] = "reproduce"
        row["log_tail"] = (out / "dryrun.log").read_text(errors="replace")[-3000:]
    print(f"[dryrun] reproduce {short} {variant}: {r['seconds']} s, rc {r['rc']}", flush=True)
    return row


def table(rows: list[dict], device: str) -> str:
    stages = ["train", "resume", "export", "generate", "evaluate"]
    head = ["config", "variant", *stages, "total s", "peak RSS GB"]
    if device != "cpu":
        head += ["s / train step", "peak GPU GB"]
    head.append("pass")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["config"], r["variant"]]
        cells += [f"{r['stages'][s]['seconds']:.0f}" if s in r["stages"] else "-" for s in stages]
        if "reproduce" in r["stages"]:
            cells[2] = f"reproduce {r['stages']['reproduce']['seconds']:.0f}"
        cells += [f"{r['seconds']:.0f}", f"{r['peak_rss_gb']:.1f}"]
        if device != "cpu":
            cells += [f"{r['step_seconds']:.2f}" if r["step_seconds"] else "-",
                      f"{r['gpu_peak_gb']:.1f}" if r["gpu_peak_gb"] else "-"]
        cells.append("yes" if r["pass"] else f"NO ({r.get('failed', '?')})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--cache", type=Path, default=None, help="stand-in folder (default ~/.cache/fair-diffusion/dryrun-v2)")
    ap.add_argument("--work", type=Path, default=None, help="run folders (default CACHE/runs-DEVICE)")
    ap.add_argument("--out", type=Path, default=REPO / "outputs" / "dryrun" / "summary.json")
    ap.add_argument("--only", nargs="+", metavar="EXP[:VARIANT]", help="a subset, e.g. exp-1-debias-gender:text-encoder")
    ap.add_argument("--no-reproduce", action="store_true")
    ap.add_argument("--build-only", action="store_true", help="build the stand-ins and stop")
    ap.add_argument("--jobs", type=int, default=None,
                    help="configs run side by side, the cores split between them (default: 2 on the CPU, 1 on a GPU)")
    ap.add_argument("--fp32", action="store_true", help="CPU: keep the frozen weights in fp32 even where bf16 is native")
    ap.add_argument("--sdxl", action="store_true", help="also the SDXL variants (debias-sdxl-*.yaml): builds the "
                    "SDXL stand-in (6.8 GB) and runs those configs one at a time")
    a = ap.parse_args(argv)
    cache = a.cache or default_cache()
    if a.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            from common.runtime import cuda_report

            print(f"error: --device cuda, but {cuda_report()}", file=sys.stderr)
            return 2
    t0 = time.time()
    manifest = build_standins(cache)
    if a.build_only:
        print(json.dumps(manifest, indent=1))
        return 0
    work = a.work or cache / f"runs-{a.device}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache / "hub"),
           "FAIR_DIFFUSION_DATA": str(cache / "data"), "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false",
           "PYTHON": sys.executable}
    todo = [(e, v) for e in EXPERIMENTS for v in variants(e, sdxl=True)]
    if a.only:
        def hit(e, v, w):
            return e == w[0] and (len(w) == 1 or v == w[1])

        want = [s.split(":", 1) for s in a.only]
        unknown = [s for s, w in zip(a.only, want) if not any(hit(e, v, w) for e, v in todo)]
        if unknown:
            print(f"error: --only {' '.join(unknown)}: not an experiment[:variant]; choices: "
                  f"{', '.join(f'{e}:{v}' for e, v in todo)}", file=sys.stderr)
            return 2
        todo = [(e, v) for e, v in todo if any(hit(e, v, w) for w in want)]
    else:
        todo = [(e, v) for e, v in todo if a.sdxl or not is_sdxl(v)]
    sdxl_todo = [(e, v) for e, v in todo if is_sdxl(v)]
    todo = [(e, v) for e, v in todo if not is_sdxl(v)]
    if sdxl_todo:
        manifest = {**manifest, "sdxl": build_sdxl_standin(cache)}
    a.jobs = a.jobs if a.jobs is not None else (2 if a.device == "cpu" else 1)
    if a.jobs < 1:
        print(f"error: --jobs {a.jobs}: expected a whole number >= 1", file=sys.stderr)
        return 2
    from common.models import cpu_supports_bf16

    bf16 = a.device == "cpu" and not a.fp32 and cpu_supports_bf16()
    a.jobs = max(1, min(a.jobs, len(todo)))
    if a.jobs > 1:  # split the cores: N processes with all threads each would only spin-wait on each other
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // a.jobs))
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(a.jobs) as pool:  # the runs are subprocesses: threads only wait on them
        rows = list(pool.map(lambda ev: run_config(*ev, a.device, work, env, bf16), todo))
    alone = {k: v for k, v in env.items() if k != "OMP_NUM_THREADS"}  # SDXL: one config at a time, every core
    rows += [run_config(e, v, a.device, work, alone, bf16) for e, v in sdxl_todo]
    if not a.no_reproduce:
        first = next((r for r in rows if r["pass"] and r["variant"] == "text-encoder"), None)
        if first is not None:
            env.pop("OMP_NUM_THREADS", None)  # alone again: all cores
            rows.append(run_reproduce(first["config"], "text-encoder", a.device, work, env, bf16))
    total = round(time.time() - t0, 1)
    text = table(rows, a.device)
    print(text)
    print(f"[dryrun] {sum(r['pass'] for r in rows)}/{len(rows)} passed in {total} s (stand-ins: {cache})")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"device": a.device, "jobs": a.jobs, "cpu_bf16": bf16, "total_seconds": total,
                                 "standins": manifest, "rows": rows,
                                 "table": text}, indent=1))
    return 0 if all(r["pass"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
