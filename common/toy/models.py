"""Load the shipped toy-world Stable Diffusion components (`data/toy/`, written by `python -m common.toy build`)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from common.toy.world import WORLD_VERSION

REPO = Path(__file__).resolve().parents[2]
TOY_DIR = REPO / "data" / "toy"
BUILD_HINT = "build it with `make toy` (or `python -m common.toy build`)"


def toy_dir(path: str | Path | None = None) -> Path:
    """The folder of the toy weights (default data/toy/), checked: it must hold a manifest of this world version."""
    d = Path(path) if path is not None else TOY_DIR
    manifest = d / "manifest.json"
    if not manifest.is_file():
        raise FileNotFoundError(f"{manifest} not found: the toy world's weights are missing; {BUILD_HINT}.")
    version = json.loads(manifest.read_text()).get("world_version")
    if version != WORLD_VERSION:
        raise ValueError(
            f"{manifest} was built for toy world version {version}, but the code draws version {WORLD_VERSION}; "
            f"rebuild: {BUILD_HINT}."
        )
    return d


def read_manifest(path: str | Path | None = None) -> dict:
    """manifest.json of the toy weights (seeds, configs, timings, measured accuracies and biases)."""
    return json.loads((toy_dir(path) / "manifest.json").read_text())


def load_weights(module: torch.nn.Module, path: str | Path | None, key: str) -> torch.nn.Module:
    """Load the fp16 safetensors file of `key` (manifest "files") into `module`, strictly (every key consumed, none
    missing), cast to fp32; returns the module in eval mode without gradients."""
    from safetensors.torch import load_file

    d = toy_dir(path)
    f = d / read_manifest(d)["files"][key]
    if not f.is_file():
        raise FileNotFoundError(f"{f} not found (listed in {d / 'manifest.json'}); {BUILD_HINT}.")
    sd = {k: v.float() for k, v in load_file(str(f)).items()}
    try:
        module.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise RuntimeError(f"{f} does not fit the toy {key} architecture ({e}); {BUILD_HINT}.") from e
    return module.eval().requires_grad_(False)


def load_toy_components(device="cpu", path: str | Path | None = None):
    """The toy world's SD components: CLIP tokenizer (the real one), 64-d 2-layer CLIPTextModel, (32, 64) U-Net with
    8x8 latents, factor-4 AutoencoderKL (32x32 images), the project's DPM-Solver++ scheduler. fp32, frozen."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from common.models import Components, clip_tokenizer, make_scheduler

    cfg = read_manifest(path)["configs"]
    vae = load_weights(AutoencoderKL(**cfg["vae"]), path, "vae")
    te = load_weights(CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"])), path, "text_encoder")
    unet = load_weights(UNet2DConditionModel(**cfg["unet"]), path, "unet")
    comps = Components(clip_tokenizer(), te, unet, vae, make_scheduler(), name="toy")
    for m in (te, unet, vae):
        m.to(device)
    return comps.freeze()
