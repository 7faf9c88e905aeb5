"""Stable Diffusion components (SD 1.x and SDXL): load real ones (hub id or local folder), build tiny SD- and
SDXL-shaped ones for tests, and the offline CLIP tokenizer.

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
from common.registry import registry

# SD 1.x noise schedule (docs/method.md#reference-numbers); SDXL base was trained with the same betas.
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
    supports it, else fp16. An explicit half precision the CPU cannot run fast says so on stderr (fp32 instead)."""
    if torch.device(device).type == "cpu":
        if name == "bf16" and cpu_supports_bf16():
            return torch.bfloat16
        if name in ("fp16", "bf16"):
            import sys

            print(f"[dtype] {name} on this CPU: running in fp32 instead (no fast {name} kernels here)", file=sys.stderr)
        return torch.float32
    if name in (None, "auto"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return DTYPES[name]


@dataclass
class Components:
    """The parts of a Stable Diffusion model. `vae_scale` is the latent scaling factor (0.18215 for SD 1.x, 0.13025
    for SDXL).

    SDXL adds a second tokenizer / text encoder (`CLIPTextModelWithProjection`, whose projected pooled output and the
    size "time ids" the U-Net takes as extra inputs); both are None for SD 1.x. `force_zeros_for_empty_prompt` is the
    SDXL pipeline's flag of that name (model_index.json; diffusers' default True): the empty negative prompt is
    replaced by zeros, as SDXL was trained to drop its conditioning. The real SDXL VAE overflows in fp16 (diffusers
    upcasts it, `force_upcast`); this project does not: run an SDXL VAE in fp32 or bf16, or use an fp16-fixed VAE."""

    tokenizer: object
    text_encoder: torch.nn.Module
    unet: torch.nn.Module
    vae: torch.nn.Module
    scheduler: object
    name: str = ""
    prompt_prefix: str = ""
    """text put in front of every prompt of the finetuned model (exp-2's soft tokens); set by `common.adapters`"""
    tokenizer_2: object = None
    text_encoder_2: torch.nn.Module | None = None
    force_zeros_for_empty_prompt: bool = True

    @property
    def is_sdxl(self) -> bool:
        """True for SDXL-style components (two text encoders; the U-Net takes pooled text embeddings and time ids)."""
        return self.text_encoder_2 is not None

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        """[text_encoder] for SD 1.x, [text_encoder, text_encoder_2] for SDXL."""
        return [self.text_encoder] + ([self.text_encoder_2] if self.is_sdxl else [])

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
        for m in (*self.text_encoders, self.unet, self.vae):
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


TINY_UNET = dict(
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=8,
    norm_num_groups=16,
)
"""the tiny SD-shaped U-Net (32, 64) with cross-attention in its outer block, less `sample_size` and
`cross_attention_dim` (the latent side and the text width of whoever builds one)"""


def tiny_components(seed: int = 0, image_size: int = 64, text_dim: int = 32, dtype=torch.float32, device="cpu"):
    """SD-architecture components with random weights, small enough for CPU tests.

    CLIPTextModel (hidden `text_dim`, 2 layers, vocab 49408) + UNet2DConditionModel (32, 64) with cross-attention +
    AutoencoderKL with 4 blocks (down-sampling 8, as SD) + the project's DPM-Solver++ scheduler + the real CLIP tokenizer.
    Same seed -> identical weights.
    """
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    te = CLIPTextModel(
        CLIPTextConfig(**CLIP_TOKENS, hidden_size=text_dim, intermediate_size=2 * text_dim, num_hidden_layers=2,
                       num_attention_heads=4, projection_dim=text_dim)
    )
    unet = UNet2DConditionModel(**TINY_UNET, sample_size=image_size // 8, cross_attention_dim=text_dim)
    vae = _tiny_vae(image_size, scaling_factor=0.18215)
    comps = Components(clip_tokenizer(), te.eval(), unet.eval(), vae.eval(), make_scheduler(), name="tiny")
    for m in (comps.text_encoder, comps.unet, comps.vae):
        m.to(device=device, dtype=dtype)
    return comps.freeze()


def _tiny_vae(image_size: int, scaling_factor: float):
    """AutoencoderKL with 4 blocks (down-sampling 8, as SD and SDXL) and 4 latent channels."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 16, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=image_size,
        scaling_factor=scaling_factor,
    )


def sdxl_tokenizer_2():
    """SDXL's second tokenizer: the same CLIP BPE tokenizer, padding with "!" (id 0) as in the SDXL repositories."""
    tok = clip_tokenizer()
    tok.pad_token = "!"
    return tok


def tiny_sdxl_components(seed: int = 0, image_size: int = 64, dtype=torch.float32, device="cpu") -> Components:
    """SDXL-architecture components with random weights, small enough for CPU tests.

    CLIPTextModel (hidden 32) + CLIPTextModelWithProjection (hidden 48, projection 32), 2 layers each, so the U-Net's
    cross-attention width is 32 + 48 = 80 (the two penultimate hidden states concatenated) + UNet2DConditionModel
    shaped like SDXL's (no attention in the first block, 2 transformer layers in the second, linear projections,
    `addition_embed_type="text_time"` with 6 time ids of 8 dims + the 32-d pooled embedding) + the tiny SD VAE with
    SDXL's scaling factor 0.13025 + the project's scheduler + the CLIP tokenizer twice (the second pads with "!").
    Same seed -> identical weights.
    """
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    dims, proj, time_dim = (32, 48), 32, 8

    def text_config(width: int) -> CLIPTextConfig:
        return CLIPTextConfig(**CLIP_TOKENS, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                              num_attention_heads=4, projection_dim=proj)

    te = CLIPTextModel(text_config(dims[0]))
    te2 = CLIPTextModelWithProjection(text_config(dims[1]))
    sdxl_layout = dict(  # the tiny U-Net's widths with SDXL's block layout and added conditioning
        TINY_UNET,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        use_linear_projection=True,
        attention_head_dim=(4, 8),
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + proj,
    )
    unet = UNet2DConditionModel(**sdxl_layout, sample_size=image_size // 8, cross_attention_dim=sum(dims))
    vae = _tiny_vae(image_size, scaling_factor=0.13025)
    comps = Components(clip_tokenizer(), te.eval(), unet.eval(), vae.eval(), make_scheduler(), name="tiny-sdxl",
                       tokenizer_2=sdxl_tokenizer_2(), text_encoder_2=te2.eval())
    check_sdxl(comps)
    for m in (*comps.text_encoders, comps.unet, comps.vae):
        m.to(device=device, dtype=dtype)
    return comps.freeze()


# ----------------------------------------------------------------------------------------------------------------
# Real components
# ----------------------------------------------------------------------------------------------------------------


MODEL_SOURCES = registry("model source")
"""model names built by a factory rather than loaded from a hub id or folder: `factory(device=..., [seed=N]) ->
Components`; `tiny` and `tiny-sdxl` here, plug-ins add theirs (the toy world)"""
MODEL_SOURCES.register("tiny", tiny_components, synthetic=True)
MODEL_SOURCES.register("tiny-sdxl", tiny_sdxl_components, synthetic=True)


def model_source(model: str) -> tuple[str, dict] | None:
    """(registered source, its options) for a model name `NAME` or `NAME:SEED` (a source whose factory takes `seed`);
    None for anything else (a hub id or a local folder)."""
    if model in MODEL_SOURCES:
        return model, {}
    name, _, seed = model.partition(":")
    if seed.isdigit() and name in MODEL_SOURCES and MODEL_SOURCES.accepts(name, "seed"):
        return name, {"seed": int(seed)}
    return None


def load_components(model: str = SD15, dtype=torch.float32, device="cpu", text_encoder_dtype=None) -> Components:
    """Tokenizer(s), text encoder(s), U-Net, VAE and the project's scheduler from a hub id, a local folder or a
    registered source (`MODEL_SOURCES`: `tiny`, random SD-shaped weights, `tiny-sdxl`, random SDXL-shaped weights,
    and the plug-ins' worlds); `tiny:SEED` / `tiny-sdxl:SEED` pick the seed. Base weights are frozen.

    SD 1.x or SDXL is read from the model itself: its U-Net config's `addition_embed_type == "text_time"` (SDXL's
    extra pooled-text and time-id inputs) makes it SDXL, which also needs tokenizer_2/ and text_encoder_2/.
    `text_encoder_dtype` overrides `dtype` for the text encoder(s) (exp-2 keeps it in fp32).
    """
    from common.runtime import quiet_libraries

    quiet_libraries()
    source = model_source(model)
    if source is not None:
        comps = MODEL_SOURCES.create(source[0], device=device, **source[1])
    else:
        comps = _load_diffusers(model, dtype, text_encoder_dtype or dtype)
    for te in comps.text_encoders:
        te.to(device=device, dtype=text_encoder_dtype or dtype)
    comps.unet.to(device=device, dtype=dtype)
    comps.vae.to(device=device, dtype=dtype)
    return comps.freeze()


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}).") from e


def _unet_is_sdxl(unet_config: dict) -> bool:
    """SDXL's U-Net takes pooled text embeddings and size time ids as extra inputs (`addition_embed_type="text_time"`)."""
    return unet_config.get("addition_embed_type") == "text_time"


def _load_diffusers(model: str, dtype=torch.float32, text_encoder_dtype=torch.float32) -> Components:
    """Loaded straight into the target dtypes (one conversion from the files' dtype, not two). SD 1.x or SDXL is
    decided by the U-Net config (`_unet_is_sdxl`); SDXL's `force_zeros_for_empty_prompt` comes from model_index.json
    (diffusers' default True when the folder has none or it lacks the key)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    local = Path(model).expanduser()
    if local.exists():
        unet_cfg = local / "unet" / "config.json"
        sdxl = unet_cfg.is_file() and _unet_is_sdxl(_read_json(unet_cfg))
        needed = ("tokenizer", "text_encoder", "unet", "vae") + (("tokenizer_2", "text_encoder_2") if sdxl else ())
        missing = [d for d in needed if not (local / d).is_dir()]
        if missing:
            raise FileNotFoundError(
                f"{local} is not a diffusers Stable Diffusion folder: missing sub-folder(s) {', '.join(missing)} "
                "(expected tokenizer/, text_encoder/, unet/, vae/ as written by `StableDiffusionPipeline.save_pretrained`, "
                "plus tokenizer_2/ and text_encoder_2/ for SDXL; the SDXL refiner, without text_encoder/, is not supported)."
            )
        src = str(local)
        index_file = local / "model_index.json"
        index = _read_json(index_file) if index_file.is_file() else {}
    else:
        src = model
    try:
        if not local.exists():  # hub id: the same two facts from the hub's files
            from diffusers import DiffusionPipeline

            sdxl = _unet_is_sdxl(UNet2DConditionModel.load_config(src, subfolder="unet"))
            index = DiffusionPipeline.load_config(src) if sdxl else {}
        tok = CLIPTokenizer.from_pretrained(src, subfolder="tokenizer")
        te = CLIPTextModel.from_pretrained(src, subfolder="text_encoder", dtype=text_encoder_dtype)
        unet = UNet2DConditionModel.from_pretrained(src, subfolder="unet", torch_dtype=dtype)
        vae = AutoencoderKL.from_pretrained(src, subfolder="vae", torch_dtype=dtype)
        extra = {}
        if sdxl:
            extra = dict(
                tokenizer_2=CLIPTokenizer.from_pretrained(src, subfolder="tokenizer_2"),
                text_encoder_2=CLIPTextModelWithProjection.from_pretrained(
                    src, subfolder="text_encoder_2", dtype=text_encoder_dtype
                ).eval(),
                force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", True)),
            )
    except OSError as e:
        if local.exists():
            raise
        raise OSError(
            f"Could not load Stable Diffusion model '{model}' (no local copy and the hub is not reachable or "
            "HF_HUB_OFFLINE=1). Download it on a connected machine with `huggingface-cli download "
            f"{model}` (or `DiffusionPipeline.from_pretrained(...).save_pretrained(DIR)`), then set "
            "`model.name` to that folder."
        ) from e
    comps = Components(tok, te.eval(), unet.eval(), vae.eval(), make_scheduler(), name=model, **extra)
    if sdxl:
        check_sdxl(comps)
    return comps


def check_sdxl(comps: Components) -> None:
    """Raise ValueError when SDXL components do not fit together: the U-Net's cross-attention width must be the sum of
    the two encoders' widths, and its added-embedding input 6 time ids x `addition_time_embed_dim` + text_encoder_2's
    `projection_dim` (the refiner's 5 ids with an aesthetic score do not fit)."""
    cfg = comps.unet.config
    widths = [te.config.hidden_size for te in comps.text_encoders]
    if cfg.cross_attention_dim != sum(widths):
        raise ValueError(
            f"{comps.name}: the U-Net's cross_attention_dim is {cfg.cross_attention_dim} but the two text encoders' "
            f"hidden sizes {widths} sum to {sum(widths)}."
        )
    wanted = comps.unet.add_embedding.linear_1.in_features
    got = 6 * cfg.addition_time_embed_dim + comps.text_encoder_2.config.projection_dim
    if wanted != got:
        raise ValueError(
            f"{comps.name}: the U-Net's added embedding takes {wanted} values but 6 time ids x "
            f"{cfg.addition_time_embed_dim} + text_encoder_2's projection_dim {comps.text_encoder_2.config.projection_dim}"
            f" = {got} (only SDXL base-style U-Nets are supported, not the refiner)."
        )


def diffusers_pipeline(comps: Components):
    """A `StableDiffusionPipeline` (SD 1.x) or `StableDiffusionXLPipeline` (SDXL, no watermarker) sharing these
    components (no safety checker), for parity checks and users."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    shared = dict(vae=comps.vae, text_encoder=comps.text_encoder, tokenizer=comps.tokenizer, unet=comps.unet,
                  scheduler=comps.scheduler)
    if comps.is_sdxl:
        return StableDiffusionXLPipeline(**shared, text_encoder_2=comps.text_encoder_2, tokenizer_2=comps.tokenizer_2,
                                         force_zeros_for_empty_prompt=comps.force_zeros_for_empty_prompt,
                                         add_watermarker=False)
    return StableDiffusionPipeline(**shared, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
