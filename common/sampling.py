"""Prompt conditioning, DPM-Solver++ rollouts that keep their trajectory, and adjusted direct finetuning (DFT).

Conditioning follows the authors (docs/method.md#conditioning): the prompt at its real token length with its attention mask,
the empty prompt padded to that length (masked, or unmasked on exp-2's prefix path), classifier-free guidance with
`[uncond; cond]` in one U-Net call. A `padded` mode reproduces diffusers' `StableDiffusionPipeline` instead.
SDXL components run through the same functions: their `Conditioning` also carries the pooled text embeddings and the
size time ids (`encode_prompts` says how each mode applies), and `padded` reproduces `StableDiffusionXLPipeline`.

Adjusted DFT (docs/method.md#adjusted-direct-finetuning): at every step the U-Net input is detached, the scheduler update stays
differentiable and the gradient reaching the guided noise prediction eps_t is multiplied by
c_t = sqrt(abar_t) sqrt(1 - abar_t) / (1 - alpha_t), normalised by the geometric mean over the steps used. Because
DPM-Solver++ is linear in the latents and the noise predictions, the final latent is z_0 = k_T z_T + sum_t k_t eps_t
with scalars k_t, and the adjusted gradient equals the gradient of the surrogate sum_t c_t k_t <eps_t(theta), g>,
g = dL/dz_0, with every eps_t evaluated at the stored trajectory latent. `dft_backward` offers both forms
(`reference`: re-run the chain with hooks; `fast`: vector-Jacobian products at the stored trajectory) plus the exact
(`naive`) gradient for ablations.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from common.models import Components

CONDITIONING_MODES = ("reference", "reference_unmasked", "padded")
DFT_MODES = ("fast", "reference", "naive")

# ----------------------------------------------------------------------------------------------------------------
# Conditioning
# ----------------------------------------------------------------------------------------------------------------


_SDXL_FIELDS = ("pooled", "uncond_pooled", "time_ids")
_GRAD_FIELDS = ("cond", "uncond", "pooled", "uncond_pooled")  # the fields gradients can flow through


@dataclass
class Conditioning:
    """Text conditioning of a batch: `cond`, `uncond` `[B, L, D]` (SD 1.x: the text encoder's last hidden state;
    SDXL: the two encoders' penultimate hidden states concatenated along D).

    SDXL only (None for SD 1.x): `pooled`, `uncond_pooled` `[B, P]` (text_encoder_2's projected pooled embedding) and
    `time_ids` `[B, 6]` fp32 (original height, width, crop top, left, target height, width), which both halves of the
    guidance batch share, as in diffusers. Rows of `uncond` / `uncond_pooled` may be an expanded view of one row (the
    empty prompt is encoded once per batch)."""

    cond: Tensor
    uncond: Tensor
    pooled: Tensor | None = None
    uncond_pooled: Tensor | None = None
    time_ids: Tensor | None = None

    def __post_init__(self):
        if self.cond.shape != self.uncond.shape or self.cond.dim() != 3:
            raise ValueError(
                f"Conditioning expects cond and uncond of one shape [B, L, D]; got {tuple(self.cond.shape)} and "
                f"{tuple(self.uncond.shape)}."
            )
        given = [k for k in _SDXL_FIELDS if getattr(self, k) is not None]
        if given and len(given) != len(_SDXL_FIELDS):
            raise ValueError(
                f"Conditioning got {given} but not all of {list(_SDXL_FIELDS)}: SDXL needs all three, SD 1.x none."
            )
        if given:
            b = len(self.cond)
            if (self.pooled.dim() != 2 or self.pooled.shape != self.uncond_pooled.shape or len(self.pooled) != b
                    or self.time_ids.dim() != 2 or len(self.time_ids) != b):
                raise ValueError(
                    f"Conditioning expects pooled and uncond_pooled [B, P] and time_ids [B, 6] with B = {b}; got "
                    f"{tuple(self.pooled.shape)}, {tuple(self.uncond_pooled.shape)} and {tuple(self.time_ids.shape)}."
                )

    @property
    def is_sdxl(self) -> bool:
        return self.pooled is not None

    def _fields(self) -> dict[str, Tensor]:
        """The tensor fields that are set, by name."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}

    def __len__(self) -> int:
        return self.cond.shape[0]

    @staticmethod
    def cat(items: Sequence[Conditioning]) -> Conditioning:
        """Stack several conditionings along the batch (e.g. finetuned + original model sharing one U-Net).

        All must have the same sequence length L: padding one of them would change what the U-Net attends to."""
        items = list(items)
        if not items:
            raise ValueError("Conditioning.cat needs at least one Conditioning.")
        lengths = sorted({c.cond.shape[1] for c in items})
        if len(lengths) > 1:
            raise ValueError(
                f"Conditioning.cat got sequence lengths {lengths}; they must be equal (the U-Net's cross-attention "
                "is unmasked, so sample these conditionings in separate calls)."
            )
        if len({c.is_sdxl for c in items}) > 1:
            raise ValueError("Conditioning.cat got SD 1.x and SDXL conditionings together; they need different U-Nets.")
        names = items[0]._fields()
        return Conditioning(**{k: torch.cat([getattr(c, k) for c in items]) for k in names})

    def slice(self, idx) -> Conditioning:
        """Rows `idx` (an int slice, index list or tensor) of the batch."""
        if isinstance(idx, int):
            idx = slice(idx, idx + 1)
        return Conditioning(**{k: v[idx] for k, v in self._fields().items()})

    def unet_context(self, dtype: torch.dtype) -> Tensor:
        """`[2B, L, D]` = `[uncond; cond]` in the U-Net's dtype: the CFG batch order of the authors and diffusers."""
        return torch.cat([self.uncond, self.cond]).to(dtype)

    def unet_added_cond(self, dtype: torch.dtype) -> dict[str, Tensor] | None:
        """SDXL's `added_cond_kwargs` for the U-Net (`text_embeds` `[2B, P]`, `time_ids` `[2B, 6]`) in the
        `[uncond; cond]` order of `unet_context` and the U-Net's dtype; None for SD 1.x."""
        if not self.is_sdxl:
            return None
        return {
            "text_embeds": torch.cat([self.uncond_pooled, self.pooled]).to(dtype),
            "time_ids": torch.cat([self.time_ids, self.time_ids]).to(dtype),
        }

    @property
    def requires_grad(self) -> bool:
        return any(v.requires_grad for k, v in self._fields().items() if k in _GRAD_FIELDS)


def _tokenize(tokenizer, texts: list[str], **kw):
    return tokenizer(texts, return_tensors="pt", **kw)


def sdxl_time_ids(target_size: tuple[int, int], original_size: tuple[int, int] | None = None,
                  crop_top_left: tuple[int, int] = (0, 0)) -> Tensor:
    """SDXL's size conditioning `[6]` fp32: original (height, width), crop (top, left), target (height, width), the
    order of diffusers' `_get_add_time_ids`. `original_size` defaults to `target_size`, as the pipeline's does."""
    original = target_size if original_size is None else original_size
    return torch.tensor([*original, *crop_top_left, *target_size], dtype=torch.float32)


def encode_prompts(components: Components, prompts: list[str], conditioning: str = "reference",
                   image_size: int | tuple[int, int] | None = None) -> Conditioning:
    """Encode prompts and the empty negative prompt as the authors did (`reference`, `reference_unmasked`) or as
    diffusers' `StableDiffusionPipeline` does (`padded`). `components.prompt_prefix` is put in front of every prompt.

    - `reference`: prompts tokenised with `padding=True` (their real length L, BOS..EOS; several prompts of different
      lengths are padded to the longest) and encoded with their attention mask; `""` padded to L with pad keys masked.
    - `reference_unmasked`: the same, but `""` is encoded without a mask (exp-2's prefix path, as the authors).
    - `padded`: both padded to the tokenizer's 77; the attention mask is passed only when the text encoder's config
      sets `use_attention_mask` (never for SD 1.x), exactly like the pipeline.

    SDXL components (`components.is_sdxl`), as `StableDiffusionXLPipeline`: each prompt goes through both tokenizers /
    encoders, `cond` = the two penultimate hidden states concatenated, `pooled` = text_encoder_2's projected pooled
    output, `time_ids` = `sdxl_time_ids(image_size)` (`image_size` (height, width) or one side; default the U-Net's
    native size, as the pipeline's; `sample` and `dft_backward` pass their noise's size). The modes:
    - `padded`: both encoders at 77 tokens without a mask (the SDXL pipeline never passes one).
    - `reference` / `reference_unmasked`: the prompt at its real length L with its mask in both encoders, as above.
    - the negative: with `components.force_zeros_for_empty_prompt` (SDXL's default) zeros in every mode (`uncond`
      and `uncond_pooled`), as the pipeline: SDXL was trained to drop its text by zeroing it. The U-Net's bias-free
      cross-attention keys and values of zero rows are zero, so its output is the same for L zero rows as for 77,
      and `reference_unmasked` equals `reference`. Without the flag, `""` is encoded as for SD 1.x (padded to 77 /
      to L masked / to L unmasked), its pooled embedding from text_encoder_2.
    `image_size` is ignored for SD 1.x.

    Returns `Conditioning` with `[B, L, D]` tensors in the text encoder's dtype. Runs with autograd when called under
    grad, so text-encoder LoRA or prefix embeddings receive gradients (for SDXL through both encoders; text_encoder's
    last layer is unused, text_encoder_2's reaches the U-Net only through `pooled`).
    """
    if conditioning not in CONDITIONING_MODES:
        raise ValueError(f"conditioning={conditioning!r} is not one of {CONDITIONING_MODES}.")
    if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"encode_prompts expects a non-empty list of strings; got {prompts!r}.")
    tok, te = components.tokenizer, components.text_encoder
    device = next(te.parameters()).device
    texts = [components.prompt_prefix + p for p in prompts]
    max_len = tok.model_max_length
    lengths = [len(ids) for ids in tok(texts).input_ids]
    if max(lengths) > max_len:
        i = lengths.index(max(lengths))
        raise ValueError(
            f"Prompt {texts[i]!r} is {lengths[i]} tokens long; the text encoder takes at most {max_len} (BOS and EOS "
            "included)."
        )
    if components.is_sdxl:
        return _encode_sdxl(components, texts, conditioning, image_size)
    if conditioning == "padded":
        use_mask = bool(getattr(te.config, "use_attention_mask", False))
        ids = _tokenize(tok, texts, padding="max_length", max_length=max_len, truncation=True)
        length = ids.input_ids.shape[1]
        empty = _tokenize(tok, [""], padding="max_length", max_length=length, truncation=True)
        cond_mask = ids.attention_mask.to(device) if use_mask else None
        empty_mask = empty.attention_mask.to(device) if use_mask else None
    else:
        ids = _tokenize(tok, texts, padding=True)
        length = ids.input_ids.shape[1]
        empty = _tokenize(tok, [""], padding="max_length", max_length=length)
        cond_mask = ids.attention_mask.to(device)
        empty_mask = empty.attention_mask.to(device) if conditioning == "reference" else None
    cond = te(ids.input_ids.to(device), attention_mask=cond_mask)[0]
    uncond = te(empty.input_ids.to(device), attention_mask=empty_mask)[0]
    return Conditioning(cond, uncond.expand(len(texts), -1, -1))


def _encode_sdxl(components: Components, texts: list[str], conditioning: str, image_size) -> Conditioning:
    """`encode_prompts` for SDXL components (see there): penultimate hidden states of both encoders, pooled projection
    of the second, time ids, zeroed or encoded negative."""
    n, padded = len(texts), conditioning == "padded"
    zero = components.force_zeros_for_empty_prompt
    counts = [[len(ids) for ids in tok(texts).input_ids] for tok in (components.tokenizer, components.tokenizer_2)]
    if counts[0] != counts[1]:
        i = next(i for i, (a, b) in enumerate(zip(*counts)) if a != b)
        raise ValueError(
            f"tokenizer and tokenizer_2 split {texts[i]!r} into {counts[0][i]} and {counts[1][i]} tokens; SDXL needs "
            "the same tokens in both (add new tokens to both tokenizers)."
        )
    hidden, empty_hidden, pooled, empty_pooled = [], [], None, None
    for tok, te in zip((components.tokenizer, components.tokenizer_2), components.text_encoders):
        device = next(te.parameters()).device
        if padded:
            ids = _tokenize(tok, texts, padding="max_length", max_length=tok.model_max_length, truncation=True)
        else:
            ids = _tokenize(tok, texts, padding=True)
        mask = None if padded else ids.attention_mask.to(device)
        out = te(ids.input_ids.to(device), attention_mask=mask, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        if te is components.text_encoder_2:
            pooled = out.text_embeds
        if zero:
            continue
        empty = _tokenize(tok, [""], padding="max_length", max_length=ids.input_ids.shape[1], truncation=True)
        empty_mask = empty.attention_mask.to(device) if conditioning == "reference" else None
        out = te(empty.input_ids.to(device), attention_mask=empty_mask, output_hidden_states=True)
        empty_hidden.append(out.hidden_states[-2])
        if te is components.text_encoder_2:
            empty_pooled = out.text_embeds
    cond = torch.cat(hidden, dim=-1)
    if zero:
        uncond, uncond_pooled = torch.zeros_like(cond), torch.zeros_like(pooled)
    else:
        uncond, uncond_pooled = torch.cat(empty_hidden, dim=-1).expand(n, -1, -1), empty_pooled.expand(n, -1)
    if image_size is None:
        image_size = components.unet.config.sample_size * components.vae_factor
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    time_ids = sdxl_time_ids(size).to(cond.device).repeat(n, 1)
    return Conditioning(cond, uncond, pooled, uncond_pooled, time_ids)


# ----------------------------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Trajectory:
    """What a rollout saw: `latents` `[K, B, 4, h, w]` (the U-Net input latent of each step, fp32), `timesteps`
    `LongTensor[K]`, `eps` `[K, B, 4, h, w]` (the guided noise predictions, fp32)."""

    latents: Tensor
    timesteps: Tensor
    eps: Tensor

    def slice(self, idx) -> Trajectory:
        return Trajectory(self.latents[:, idx], self.timesteps, self.eps[:, idx])


@dataclass
class Rollout:
    """Result of `sample`: `images` `[B, 3, H, W]` in [-1, 1] (None when not decoded), final `latents` `[B, 4, h, w]`
    (fp32, scheduler space: not divided by the VAE scale), optional `trajectory`."""

    images: Tensor | None
    latents: Tensor
    trajectory: Trajectory | None = None

    def slice(self, idx) -> Rollout:
        """Rows `idx` of the batch (an int slice, index list or tensor)."""
        if isinstance(idx, int):
            idx = slice(idx, idx + 1)
        return Rollout(
            None if self.images is None else self.images[idx],
            self.latents[idx],
            None if self.trajectory is None else self.trajectory.slice(idx),
        )


def _up(x: Tensor) -> Tensor:
    """Half precision -> fp32; fp32 and fp64 stay (fp64 is for exactness tests)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _unet_dtype(components: Components) -> torch.dtype:
    return components.unet.dtype


def _guided_eps(components: Components, x: Tensor, t: Tensor, context: Tensor, guidance: float,
                added: dict[str, Tensor] | None = None) -> Tensor:
    """Guided noise prediction `[n, 4, h, w]` fp32 for U-Net inputs `x` `[n, 4, h, w]` at timestep(s) `t` (0-dim or
    `[n]`) with `context` `[2n, L, D]` = `[uncond; cond]` and SDXL's `added` inputs in the same order (None for SD
    1.x; `Conditioning.unet_added_cond`): one U-Net call, guidance in fp32."""
    unet = components.unet
    dtype = _unet_dtype(components)
    x2 = torch.cat([x, x]).to(dtype)
    t2 = torch.cat([t, t]) if t.dim() == 1 else t
    out = _up(unet(x2, t2, encoder_hidden_states=context.to(dtype), added_cond_kwargs=added).sample)
    eps_u, eps_c = out.chunk(2)
    return eps_u + guidance * (eps_c - eps_u)


def decode(components: Components, latents: Tensor) -> Tensor:
    """VAE decode: latents `[B, 4, h, w]` (scheduler space) -> images `[B, 3, H, W]` fp32 in [-1, 1] (clamped, so
    saturated pixels pass no gradient, as in the authors' code). Differentiable."""
    vae = components.vae
    z = (latents / components.vae_scale).to(next(vae.parameters()).dtype)
    return _up(vae.decode(z).sample).clamp(-1, 1)


_decode = decode  # `sample` has a flag named `decode`


def _image_size(components: Components, noise: Tensor) -> tuple[int, int] | None:
    """(height, width) in pixels of the images `noise` `[B, C, h, w]` makes, for SDXL's time ids; None for SD 1.x
    (which ignores it) or a malformed noise (reported by `_check_noise`)."""
    if not components.is_sdxl or noise.dim() != 4:
        return None
    return (noise.shape[2] * components.vae_factor, noise.shape[3] * components.vae_factor)


def _check_conditioning(components: Components, cond: Conditioning, noise: Tensor) -> None:
    """A pre-computed Conditioning must suit the model (SDXL or not) and, for SDXL, target the noise's image size."""
    if cond.is_sdxl != components.is_sdxl:
        kinds = ("an SDXL", "SD 1.x") if cond.is_sdxl else ("an SD 1.x", "SDXL")
        raise ValueError(f"{kinds[0]} Conditioning was given for {kinds[1]} components ({components.name}).")
    if cond.is_sdxl:
        size = _image_size(components, noise)
        targets = {tuple(int(v) for v in row) for row in cond.time_ids[:, 4:6].tolist()}
        if targets != {size}:
            raise ValueError(
                f"Conditioning time ids target image size(s) {sorted(targets)} but the noise makes {size} images: "
                f"encode the prompts with encode_prompts(..., image_size={size})."
            )


def _check_noise(components: Components, noise: Tensor, n: int) -> None:
    if noise.dim() != 4 or noise.shape[0] != n or noise.shape[1] != components.unet.config.in_channels:
        raise ValueError(
            f"noise must be [B, {components.unet.config.in_channels}, h, w] with B = {n} (the number of prompts); got "
            f"{tuple(noise.shape)}."
        )


def _rollout(
    components: Components, cond: Conditioning, noise: Tensor, steps: int, guidance: float, record: bool, bar=None
) -> tuple[Tensor, Trajectory | None]:
    """No-grad DPM-Solver++ rollout of one chunk; returns final latents `[B, 4, h, w]` and optionally the trajectory."""
    sched = components.scheduler
    sched.set_timesteps(steps, device=noise.device)
    latents = _up(noise) * sched.init_noise_sigma
    context = cond.unet_context(_unet_dtype(components))
    added = cond.unet_added_cond(_unet_dtype(components))
    xs, epss = [], []
    for t in sched.timesteps:
        x = sched.scale_model_input(latents, t)
        eps = _guided_eps(components, x, t, context, guidance, added)
        if record:
            xs.append(_up(x))
            epss.append(eps)
        latents = sched.step(eps, t, latents).prev_sample
        if bar is not None:
            bar.update(1)
    traj = None
    if record:
        traj = Trajectory(torch.stack(xs), sched.timesteps.detach().clone().long(), torch.stack(epss))
    return latents, traj


@torch.no_grad()
def sample(
    components: Components,
    prompts: list[str] | Conditioning,
    noise: Tensor,
    steps: int,
    guidance: float = 7.5,
    conditioning: str = "reference",
    return_trajectory: bool = False,
    decode: bool = True,
    batch_size: int | None = None,
    progress: bool = False,
    decode_chunk: int | None = None,
) -> Rollout:
    """Generate without gradient: noise `[B, 4, h, w]` -> `Rollout` (images `[B, 3, H, W]` in [-1, 1]).

    The scheduler is `components.scheduler` (reset with `set_timesteps` for every chunk); latents start at
    `noise * init_noise_sigma`; CFG runs `[uncond; cond]` through one U-Net call and combines in fp32; the scheduler
    state stays fp32 while the U-Net may be fp16/bf16. `prompts` may be a pre-computed `Conditioning` (e.g.
    `Conditioning.cat([finetuned, original])` with the noise repeated, so two models sharing the U-Net roll out
    together). `batch_size` bounds how many images go through the U-Net at once (None: all); `decode_chunk` how many
    go through one VAE decode (None: as many as `batch_size`). `progress` shows a bar.
    SDXL: prompts are encoded with time ids for the noise's image size; a given `Conditioning` must target that size.
    """
    if isinstance(prompts, Conditioning):
        cond = prompts
    else:
        cond = encode_prompts(components, prompts, conditioning, image_size=_image_size(components, noise))
    _check_noise(components, noise, len(cond))
    _check_conditioning(components, cond, noise)
    if steps < 1:
        raise ValueError(f"steps must be >= 1; got {steps}.")
    n = len(cond)
    bs = n if batch_size is None else int(batch_size)
    if bs < 1:
        raise ValueError(f"batch_size must be >= 1 or None; got {batch_size}.")
    if decode_chunk is not None and decode_chunk < 1:
        raise ValueError(f"decode_chunk must be >= 1 or None; got {decode_chunk}.")
    bar = tqdm(total=steps * math.ceil(n / bs), desc="sampling", disable=not progress, leave=False)
    finals, trajs, images = [], [], []
    for start in range(0, n, bs):
        sl = slice(start, min(n, start + bs))
        z, traj = _rollout(components, cond.slice(sl), noise[sl], steps, guidance, return_trajectory, bar)
        finals.append(z)
        trajs.append(traj)
        if decode:
            dc = len(z) if decode_chunk is None else int(decode_chunk)
            images += [_decode(components, z[i : i + dc]) for i in range(0, len(z), dc)]
    bar.close()
    trajectory = None
    if return_trajectory:
        trajectory = Trajectory(
            torch.cat([t.latents for t in trajs], 1), trajs[0].timesteps, torch.cat([t.eps for t in trajs], 1)
        )
    return Rollout(torch.cat(images) if decode else None, torch.cat(finals), trajectory)


# ----------------------------------------------------------------------------------------------------------------
# Adjusted DFT
# ----------------------------------------------------------------------------------------------------------------


def dft_coefficients(scheduler, timesteps: Tensor | Sequence[int]) -> Tensor:
    """Adjusted-DFT gradient scales c_t = sqrt(abar_t) sqrt(1 - abar_t) / (1 - alpha_t) for `timesteps` `[K]`, divided
    by their geometric mean; float64 `[K]`. alpha_t and abar_t are the scheduler's training-schedule tables."""
    t = torch.as_tensor(timesteps).long().cpu()
    alphas = scheduler.alphas.double()
    abar = scheduler.alphas_cumprod.double()
    c = abar[t].sqrt() * (1 - abar[t]).sqrt() / (1 - alphas[t])
    return c / c.log().mean().exp()


def solver_coefficients(scheduler, steps: int) -> Tensor:
    """k_t `[K]` (float64): the coefficient of each step's noise prediction in the final latent when the U-Net inputs
    are treated as constants (z_0 = k_T z_T + sum_t k_t eps_t).

    Obtained without hand derivation: a fresh copy of the scheduler runs its own `step` on scalar latents starting
    from 0 with the noise predictions as scalar leaves, and autograd differentiates the result."""
    s = type(scheduler).from_config(scheduler.config)
    s.set_timesteps(steps, device="cpu")
    leaves = [torch.zeros(1, 1, 1, 1, dtype=torch.float64, requires_grad=True) for _ in s.timesteps]
    with torch.enable_grad():
        x = torch.zeros(1, 1, 1, 1, dtype=torch.float64)
        for eps, t in zip(leaves, s.timesteps):
            x = s.step(eps, t, x).prev_sample
        grads = torch.autograd.grad(x.sum(), leaves, allow_unused=True)
    return torch.stack([torch.zeros(()) if g is None else g.reshape(()) for g in grads]).double()


@contextmanager
def _checkpointing(*modules):
    """Turn on (non-reentrant) gradient checkpointing for the modules that support it; restore the state after."""
    changed = []
    for m in modules:
        if getattr(m, "_supports_gradient_checkpointing", False) and not m.is_gradient_checkpointing:
            m.enable_gradient_checkpointing()
            changed.append(m)
    try:
        yield
    finally:
        for m in changed:
            m.disable_gradient_checkpointing()


@contextmanager
def _no_checkpointing(*modules):
    """Turn gradient checkpointing off for the duration (the fast form needs no recomputation)."""
    changed = []
    for m in modules:
        if getattr(m, "_supports_gradient_checkpointing", False) and m.is_gradient_checkpointing:
            m.disable_gradient_checkpointing()
            changed.append(m)
    try:
        yield
    finally:
        for m in changed:
            m.enable_gradient_checkpointing()


def _has_trainable(components: Components) -> bool:
    """True when a U-Net tensor requires grad or the conditioning does (text-encoder LoRA, or prefix embeddings that
    live outside the text encoder's parameters and reach it through a hook): probed with one short encoding."""
    if any(p.requires_grad for p in components.unet.parameters()):
        return True
    with torch.enable_grad():
        probe = encode_prompts(components, [""], "reference")
        return probe.cond.requires_grad or (probe.is_sdxl and probe.pooled.requires_grad)


def dft_backward(
    components: Components,
    prompts: list[str],
    noise: Tensor,
    steps: int,
    loss_fn: Callable[[Tensor], Tensor],
    *,
    mode: str = "fast",
    rollout: Rollout | None = None,
    guidance: float = 7.5,
    conditioning: str = "reference",
    last_k: int | None = None,
    chunk: int = 8,
    decode_chunk: int = 2,
    checkpointing: bool = False,
    progress: bool = False,
) -> Tensor:
    """Accumulate the DFT gradient of `loss_fn(images)` into `.grad` of every text-encoder / U-Net tensor that requires
    grad (LoRA, prefix embeddings); returns the loss value (detached).

    `noise` `[B, 4, h, w]`; `loss_fn(images [B, 3, H, W] in [-1, 1] with grad) -> scalar`.
    - `mode="reference"`: re-run the chain with gradient: U-Net input detached, scheduler step differentiable, a hook
      scales the gradient of each guided eps_t by the normalised c_t; U-Net and VAE gradient checkpointing
      (non-reentrant) on for the call.
    - `mode="fast"`: the same gradient from `rollout` (with trajectory, from `sample` on the same noise/steps/
      conditioning): g = dL/dz_0 by one backward through the losses and the VAE decode (chunks of `decode_chunk`
      images), then vector-Jacobian products of the U-Net at the stored (z_t, t) with weights c_t k_t, `chunk`
      (image, step) pairs per U-Net call. The text encoder runs once; its gradient is back-propagated once at the end.
      `checkpointing=True` recomputes each U-Net call's activations during its VJP instead of keeping them (SDXL at
      1024 px: the same gradient for about a third more U-Net compute).
      `loss_fn` receives the rollout's images (a leaf with grad), so hooks on them work as usual.
    - `mode="naive"`: the exact gradient through the undetached chain, no coefficients (ablation).
    `last_k`: only the last K steps receive gradient (the coefficients are normalised over those K steps).
    Memory: `reference` holds the whole batch's checkpointed chain; `fast` holds one U-Net call of `chunk` pairs
    (2 * chunk U-Net inputs with activations) or one decode of `decode_chunk` images, whichever is larger.
    A loss without a path to the images (e.g. no face found) accumulates nothing.
    """
    if mode not in DFT_MODES:
        raise ValueError(f"mode={mode!r} is not one of {DFT_MODES}.")
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise ValueError(f"dft_backward expects a list of prompt strings; got {type(prompts).__name__}.")
    _check_noise(components, noise, len(prompts))
    if last_k is not None and not 1 <= last_k <= steps:
        raise ValueError(f"last_k must be in [1, steps={steps}] or None; got {last_k}.")
    if chunk < 1 or decode_chunk < 1:
        raise ValueError(f"chunk and decode_chunk must be >= 1; got {chunk} and {decode_chunk}.")
    if not _has_trainable(components):
        raise ValueError("dft_backward found no text-encoder or U-Net tensor that requires grad: nothing to train.")
    first = 0 if last_k is None else steps - last_k
    if mode == "fast":
        return _dft_fast(
            components, list(prompts), noise, steps, loss_fn, rollout, guidance, conditioning, first, chunk,
            decode_chunk, checkpointing, progress,
        )
    return _dft_chain(components, list(prompts), noise, steps, loss_fn, mode, guidance, conditioning, first, progress)


def _dft_chain(
    components: Components, prompts, noise, steps, loss_fn, mode, guidance, conditioning, first, progress
) -> Tensor:
    """Reference / naive form: one differentiable rollout of the whole batch, then decode, loss, backward."""
    sched = components.scheduler
    sched.set_timesteps(steps, device=noise.device)
    coeffs = dft_coefficients(sched, sched.timesteps[first:]).tolist()
    with _checkpointing(components.unet, components.vae), torch.enable_grad():
        cond = encode_prompts(components, prompts, conditioning, image_size=_image_size(components, noise))
        context = cond.unet_context(_unet_dtype(components))
        added = cond.unet_added_cond(_unet_dtype(components))
        latents = _up(noise) * sched.init_noise_sigma
        for i, t in enumerate(tqdm(sched.timesteps, desc=f"DFT {mode}", disable=not progress, leave=False)):
            if i < first:  # outside the last K steps: no gradient at all
                with torch.no_grad():
                    eps = _guided_eps(components, sched.scale_model_input(latents, t), t, context, guidance, added)
                    latents = sched.step(eps, t, latents).prev_sample
                continue
            x = latents.detach() if mode == "reference" else latents
            eps = _guided_eps(components, sched.scale_model_input(x, t), t, context, guidance, added)
            if mode == "reference" and eps.requires_grad:
                c = coeffs[i - first]
                eps.register_hook(lambda grad, c=c: grad * c)
            latents = sched.step(eps, t, latents).prev_sample
        loss = loss_fn(_decode(components, latents))
        if loss.requires_grad:  # a loss with no path to the images (e.g. no face found) adds nothing
            loss.backward()
    return loss.detach()


def _dft_fast(
    components: Components, prompts, noise, steps, loss_fn, rollout, guidance, conditioning, first, chunk,
    decode_chunk, checkpointing, progress,
) -> Tensor:
    """Fast form: g = dL/dz_0 from the stored final latent, then batched U-Net VJPs at the stored trajectory."""
    if rollout is None or rollout.trajectory is None:
        raise ValueError("dft_backward(mode='fast') needs `rollout` from sample(..., return_trajectory=True).")
    traj = rollout.trajectory
    n = noise.shape[0]
    if traj.latents.shape[:2] != (steps, n):
        raise ValueError(
            f"rollout trajectory has {traj.latents.shape[0]} steps x {traj.latents.shape[1]} images; expected {steps} "
            f"x {n} (the same noise and steps as this call)."
        )
    sched = components.scheduler
    sched.set_timesteps(steps, device=traj.timesteps.device)
    if not torch.equal(sched.timesteps.long(), traj.timesteps.long()):
        raise ValueError(
            f"rollout timesteps {traj.timesteps.tolist()} differ from the scheduler's for {steps} steps "
            f"{sched.timesteps.tolist()}: sample and dft_backward must use the same scheduler."
        )
    start = (_up(noise) * sched.init_noise_sigma).to(traj.latents)
    if not torch.allclose(traj.latents[0], start, rtol=1e-5, atol=1e-5):
        raise ValueError("rollout was not generated from this `noise`: its first trajectory latent differs.")
    timesteps = traj.timesteps
    weights = torch.zeros(steps, dtype=torch.float64)
    weights[first:] = dft_coefficients(sched, timesteps[first:]) * solver_coefficients(sched, steps)[first:]

    # g = dL/dz_0: the loss on the rollout's images (a leaf), then the decode's VJP in chunks.
    z0 = rollout.latents.detach()
    if rollout.images is not None:
        images = _up(rollout.images.detach())
    else:
        with torch.no_grad():
            images = torch.cat([_decode(components, z0[i : i + decode_chunk]) for i in range(0, n, decode_chunk)])
    images.requires_grad_(True)
    with torch.enable_grad():
        loss = loss_fn(images)
        if not loss.requires_grad:  # no path to the images (e.g. no face found): nothing to accumulate
            return loss.detach()
        (g_img,) = torch.autograd.grad(loss, images, allow_unused=True, materialize_grads=True)
        g = torch.empty_like(z0)
        for i in range(0, n, decode_chunk):
            z = z0[i : i + decode_chunk].clone().requires_grad_(True)
            (g[i : i + decode_chunk],) = torch.autograd.grad(_decode(components, z), z, g_img[i : i + decode_chunk])

    # The text encoder runs once with grad; the U-Net chunks write into detached leaves whose grads go back at the end.
    pairs = [(k, b) for k in range(first, steps) for b in range(n)]
    recompute = _checkpointing if checkpointing else _no_checkpointing
    with recompute(components.unet), torch.enable_grad():
        cond = encode_prompts(components, prompts, conditioning, image_size=_image_size(components, noise))
        # per tensor: with prefix tokens only the conditional branch carries them (the empty prompt has no prefix);
        # SDXL's pooled embeddings are leaves too, its time ids are constants
        grad_fields = [k for k in _GRAD_FIELDS if getattr(cond, k) is not None]
        leaf = dataclasses.replace(cond, **{k: getattr(cond, k).detach().requires_grad_(getattr(cond, k).requires_grad)
                                            for k in grad_fields})
        for s in tqdm(range(0, len(pairs), chunk), desc="DFT fast", disable=not progress, leave=False):
            ks = torch.tensor([p[0] for p in pairs[s : s + chunk]])
            bs = torch.tensor([p[1] for p in pairs[s : s + chunk]])
            dev = traj.latents.device
            x = traj.latents[ks.to(dev), bs.to(dev)]
            t = timesteps[ks.to(timesteps.device)].to(dev)
            rows = leaf.slice(bs.to(leaf.cond.device))
            context = rows.unet_context(_unet_dtype(components))
            eps = _guided_eps(components, x, t, context, guidance, rows.unet_added_cond(_unet_dtype(components)))
            w = weights[ks].to(device=eps.device, dtype=eps.dtype).view(-1, 1, 1, 1)
            surrogate = (w * g[bs.to(g.device)] * eps).sum()
            if surrogate.requires_grad:
                surrogate.backward()
        if cond.requires_grad:
            outs = [(getattr(cond, k), getattr(leaf, k).grad) for k in grad_fields]
            live = [(o, gr) for o, gr in outs if gr is not None and o.requires_grad]
            torch.autograd.backward([o for o, _ in live], [gr for _, gr in live])
    return loss.detach()
