"""Stable Diffusion components: load real ones (hub id or local folder), build tiny SD-shaped ones for tests, and the
offline CLIP tokenizer.

Every tool receives a `Components` bundle; nothing else in the project calls `from_pretrained` on SD parts.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from common.config import SD15  # noqa: F401 - re-exported: the default base model

# SD 1.x noise schedule (Appendix A of the reference notes).
SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def cpu_supports_bf16() -> bool:
    """True when this CPU has native bf16 matrix instructions (AVX512-BF16 / AMX), where oneDNN runs bf16 matmuls and
    convolutions about 2-3x faster than fp32; elsewhere bf16 on the CPU is emulated and slow."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_dtype(name: str | None, device) -> torch.dtype:
    """A config / CLI dtype name on `device`. On the CPU: fp32, except an explicit `bf16` on a CPU with native bf16
    (`cpu_supports_bf16`); fp16 is never run there (no fast CPU kernels). `auto` (or None) is bf16 on a GPU that
    supports it, else fp16."""
    if torch.device(device).type == "cpu":
        return torch.bfloat16 if name == "bf16" and cpu_supports_bf16() else torch.float32
    if name in (None, "auto"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return DTYPES[name]


@dataclass
class Components:
    """The five parts of a Stable Diffusion model. `vae_scale` is the latent scaling factor (0.18215 for SD 1.x)."""

    tokenizer: object
    text_encoder: torch.nn.Module
    unet: torch.nn.Module
    vae: torch.nn.Module
    scheduler: object
    name: str = ""
    prompt_prefix: str = ""
    """text put in front of every prompt of the finetuned model (exp-2's soft tokens); set by `common.adapters`"""

    @property
    def vae_scale(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def vae_factor(self) -> int:
        """Spatial down-sampling of the VAE (8 for SD): image side = latent side * vae_factor."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def latent_shape(self, image_size: int | None = None) -> tuple[int, int, int]:
        """[C, h, w] of one latent for images of `image_size` pixels (default: the U-Net's native sample size)."""
        side = self.unet.config.sample_size if image_size is None else image_size // self.vae_factor
        return (self.unet.config.in_channels, side, side)

    def freeze(self) -> Components:
        """Freeze every base weight (adapters added later stay trainable)."""
        for m in (self.text_encoder, self.unet, self.vae):
            m.requires_grad_(False)
        return self


CLIP_TOKENS = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
"""CLIPTextConfig fields fixed by the real CLIP tokenizer (`clip_tokenizer`): every small text encoder built here uses them"""


def make_scheduler(**overrides):
    """DPM-Solver++ (multistep, 2nd order) configured as the authors' diffusers 0.19.3 version behaved.

    Current diffusers defaults differ in one place that matters: the final step. 0.19.3 went to the sigma of t = 0
    (`final_sigmas_type="sigma_min"`) and used a first-order final step only below 15 steps (`lower_order_final`);
    today's default `"zero"` forces a first-order final step always. Timesteps are `linspace` (999, 946, ... for 19).
    """
    from diffusers import DPMSolverMultistepScheduler

    cfg = dict(
        SD_SCHEDULE,
        algorithm_type="dpmsolver++",
        solver_order=2,
        solver_type="midpoint",
        lower_order_final=True,
        final_sigmas_type="sigma_min",
        timestep_spacing="linspace",
        prediction_type="epsilon",
        use_karras_sigmas=False,
        steps_offset=1,
    )
    cfg.update(overrides)
    return DPMSolverMultistepScheduler(**cfg)


# ----------------------------------------------------------------------------------------------------------------
# Offline CLIP tokenizer
# ----------------------------------------------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP reversible byte -> printable-unicode table (the standard construction)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _tokenizer_dir() -> Path:
    import open_clip

    bpe = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    if not bpe.exists():
        raise FileNotFoundError(f"{bpe} not found: the offline CLIP tokenizer is built from open_clip_torch's BPE file.")
    digest = hashlib.sha1(bpe.read_bytes()).hexdigest()[:12]
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fair-diffusion" / f"clip-tokenizer-{digest}"
    if (root / "vocab.json").exists() and (root / "merges.txt").exists():
        return root
    lines = gzip.open(bpe).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]  # lines 1..48894
    symbols = list(_bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    tmp = root.with_name(root.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (tmp / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    try:
        tmp.rename(root)
    except OSError:  # another process won the race; its files are identical
        pass
    return root


@lru_cache(maxsize=1)
def _clip_tokenizer_cached():
    from transformers import CLIPTokenizer

    d = _tokenizer_dir()
    return CLIPTokenizer.from_pretrained(
        str(d),
        model_max_length=77,
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )


def clip_tokenizer():
    """The OpenAI CLIP tokenizer (SD 1.x's), built offline from open_clip's BPE file; a fresh copy on every call
    (callers may add tokens to it)."""
    import copy

    return copy.deepcopy(_clip_tokenizer_cached())


# ----------------------------------------------------------------------------------------------------------------
# Tiny SD-shaped components
# ----------------------------------------------------------------------------------------------------------------


def tiny_components(seed: int = 0, image_size: int = 64, text_dim: int = 32, dtype=torch.float32, device="cpu"):
    """SD-architecture components with random weights, small enough for CPU tests.

    CLIPTextModel (hidden `text_dim`, 2 layers, vocab 49408) + UNet2DConditionModel (32, 64) with cross-attention +
    AutoencoderKL with 4 blocks (down-sampling 8, as SD) + the project's DPM-Solver++ scheduler + the real CLIP tokenizer.
    Same seed -> identical weights.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    te = CLIPTextModel(
        CLIPTextConfig(**CLIP_TOKENS, hidden_size=text_dim, intermediate_size=2 * text_dim, num_hidden_layers=2,
                       num_attention_heads=4, projection_dim=text_dim)
    )
    unet = UNet2DConditionModel(
        sample_size=image_size // 8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=text_dim,
        attention_head_dim=8,
        norm_num_groups=16,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 16, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=image_size,
        scaling_factor=0.18215,
    )
    comps = Components(clip_tokenizer(), te.eval(), unet.eval(), vae.eval(), make_scheduler(), name="tiny")
    for m in (comps.text_encoder, comps.unet, comps.vae):
        m.to(device=device, dtype=dtype)
    return comps.freeze()


# ----------------------------------------------------------------------------------------------------------------
# Real components
# ----------------------------------------------------------------------------------------------------------------


def load_components(model: str = SD15, dtype=torch.float32, device="cpu", text_encoder_dtype=None) -> Components:
    """Tokenizer, text encoder, U-Net, VAE and the project's scheduler from a hub id, a local folder, `toy` (the
    shipped toy world) or `tiny` (random SD-shaped weights). Base weights are frozen.

    `text_encoder_dtype` overrides `dtype` for the text encoder (exp-2 keeps it in fp32).
    """
    from common.runtime import quiet_libraries

    quiet_libraries()
    if model == "toy":
        from common.toy.models import load_toy_components

        comps = load_toy_components(device=device)
    elif model == "tiny" or model.startswith("tiny:"):
        seed = int(model.split(":", 1)[1]) if ":" in model else 0
        comps = tiny_components(seed=seed)
    else:
        comps = _load_diffusers(model, dtype, text_encoder_dtype or dtype)
    comps.text_encoder.to(device=device, dtype=text_encoder_dtype or dtype)
    comps.unet.to(device=device, dtype=dtype)
    comps.vae.to(device=device, dtype=dtype)
    return comps.freeze()


def _load_diffusers(model: str, dtype=torch.float32, text_encoder_dtype=torch.float32) -> Components:
    """Loaded straight into the target dtypes (one conversion from the files' dtype, not two)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    local = Path(model).expanduser()
    if local.exists():
        missing = [d for d in ("tokenizer", "text_encoder", "unet", "vae") if not (local / d).is_dir()]
        if missing:
            raise FileNotFoundError(
                f"{local} is not a diffusers Stable Diffusion folder: missing sub-folder(s) {', '.join(missing)} "
                "(expected tokenizer/, text_encoder/, unet/, vae/ as written by `StableDiffusionPipeline.save_pretrained`)."
            )
        src = str(local)
    else:
        src = model
    try:
        tok = CLIPTokenizer.from_pretrained(src, subfolder="tokenizer")
        te = CLIPTextModel.from_pretrained(src, subfolder="text_encoder", dtype=text_encoder_dtype)
        unet = UNet2DConditionModel.from_pretrained(src, subfolder="unet", torch_dtype=dtype)
        vae = AutoencoderKL.from_pretrained(src, subfolder="vae", torch_dtype=dtype)
    except OSError as e:
        if local.exists():
            raise
        raise OSError(
            f"Could not load Stable Diffusion model '{model}' (no local copy and the hub is not reachable or "
            "HF_HUB_OFFLINE=1). Download it on a connected machine with `huggingface-cli download "
            f"{model}` (or `StableDiffusionPipeline.from_pretrained(...).save_pretrained(DIR)`), then set "
            "`model.name` to that folder."
        ) from e
    return Components(tok, te.eval(), unet.eval(), vae.eval(), make_scheduler(), name=model)


def diffusers_pipeline(comps: Components):
    """A `StableDiffusionPipeline` sharing these components (no safety checker), for parity checks and users."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=comps.vae,
        text_encoder=comps.text_encoder,
        tokenizer=comps.tokenizer,
        unet=comps.unet,
        scheduler=comps.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
