"""Prompt conditioning, DPM-Solver++ rollouts that keep their trajectory, and adjusted direct finetuning (DFT).

Conditioning follows the authors (reference notes §2.2): the prompt at its real token length with its attention mask,
the empty prompt padded to that length (masked, or unmasked on exp-2's prefix path), classifier-free guidance with
`[uncond; cond]` in one U-Net call. A `padded` mode reproduces diffusers' `StableDiffusionPipeline` instead.

Adjusted DFT (paper §1.5, reference notes §2.7): at every step the U-Net input is detached, the scheduler update stays
differentiable and the gradient reaching the guided noise prediction eps_t is multiplied by
c_t = sqrt(abar_t) sqrt(1 - abar_t) / (1 - alpha_t), normalised by the geometric mean over the steps used. Because
DPM-Solver++ is linear in the latents and the noise predictions, the final latent is z_0 = k_T z_T + sum_t k_t eps_t
with scalars k_t, and the adjusted gradient equals the gradient of the surrogate sum_t c_t k_t <eps_t(theta), g>,
g = dL/dz_0, with every eps_t evaluated at the stored trajectory latent. `dft_backward` offers both forms
(`reference`: re-run the chain with hooks; `fast`: vector-Jacobian products at the stored trajectory) plus the exact
(`naive`) gradient for ablations.
"""

from __future__ import annotations

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


@dataclass
class Conditioning:
    """Text conditioning of a batch: `cond`, `uncond` `[B, L, D]` (the text encoder's last hidden state).

    Rows of `uncond` may be an expanded view of one row (the empty prompt is encoded once per batch)."""

    cond: Tensor
    uncond: Tensor

    def __post_init__(self):
        if self.cond.shape != self.uncond.shape or self.cond.dim() != 3:
            raise ValueError(
                f"Conditioning expects cond and uncond of one shape [B, L, D]; got {tuple(self.cond.shape)} and "
                f"{tuple(self.uncond.shape)}."
            )

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
        return Conditioning(torch.cat([c.cond for c in items]), torch.cat([c.uncond for c in items]))

    def slice(self, idx) -> Conditioning:
        """Rows `idx` (an int slice, index list or tensor) of the batch."""
        if isinstance(idx, int):
            idx = slice(idx, idx + 1)
        return Conditioning(self.cond[idx], self.uncond[idx])

    def unet_context(self, dtype: torch.dtype) -> Tensor:
        """`[2B, L, D]` = `[uncond; cond]` in the U-Net's dtype: the CFG batch order of the authors and diffusers."""
        return torch.cat([self.uncond, self.cond]).to(dtype)

    @property
    def requires_grad(self) -> bool:
        return self.cond.requires_grad or self.uncond.requires_grad


def _tokenize(tokenizer, texts: list[str], **kw):
    return tokenizer(texts, return_tensors="pt", **kw)


def encode_prompts(components: Components, prompts: list[str], conditioning: str = "reference") -> Conditioning:
    """Encode prompts and the empty negative prompt as the authors did (`reference`, `reference_unmasked`) or as
    diffusers' `StableDiffusionPipeline` does (`padded`). `components.prompt_prefix` is put in front of every prompt.

    - `reference`: prompts tokenised with `padding=True` (their real length L, BOS..EOS; several prompts of different
      lengths are padded to the longest) and encoded with their attention mask; `""` padded to L with pad keys masked.
    - `reference_unmasked`: the same, but `""` is encoded without a mask (exp-2's prefix path, §1.6 of the notes).
    - `padded`: both padded to the tokenizer's 77; the attention mask is passed only when the text encoder's config
      sets `use_attention_mask` (never for SD 1.x), exactly like the pipeline.

    Returns `Conditioning` with `[B, L, D]` tensors in the text encoder's dtype. Runs with autograd when called under
    grad, so text-encoder LoRA or prefix embeddings receive gradients.
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


def _guided_eps(components: Components, x: Tensor, t: Tensor, context: Tensor, guidance: float) -> Tensor:
    """Guided noise prediction `[n, 4, h, w]` fp32 for U-Net inputs `x` `[n, 4, h, w]` at timestep(s) `t` (0-dim or
    `[n]`) with `context` `[2n, L, D]` = `[uncond; cond]`: one U-Net call, guidance in fp32."""
    unet = components.unet
    dtype = _unet_dtype(components)
    x2 = torch.cat([x, x]).to(dtype)
    t2 = torch.cat([t, t]) if t.dim() == 1 else t
    out = _up(unet(x2, t2, encoder_hidden_states=context.to(dtype)).sample)
    eps_u, eps_c = out.chunk(2)
    return eps_u + guidance * (eps_c - eps_u)


def decode(components: Components, latents: Tensor) -> Tensor:
    """VAE decode: latents `[B, 4, h, w]` (scheduler space) -> images `[B, 3, H, W]` fp32 in [-1, 1] (clamped, so
    saturated pixels pass no gradient, as in the authors' code). Differentiable."""
    vae = components.vae
    z = (latents / components.vae_scale).to(next(vae.parameters()).dtype)
    return _up(vae.decode(z).sample).clamp(-1, 1)


_decode = decode  # `sample` has a flag named `decode`


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
    xs, epss = [], []
    for t in sched.timesteps:
        x = sched.scale_model_input(latents, t)
        eps = _guided_eps(components, x, t, context, guidance)
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
    """
    cond = prompts if isinstance(prompts, Conditioning) else encode_prompts(components, prompts, conditioning)
    _check_noise(components, noise, len(cond))
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
        return encode_prompts(components, [""], "reference").cond.requires_grad


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
            decode_chunk, progress,
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
        cond = encode_prompts(components, prompts, conditioning)
        context = cond.unet_context(_unet_dtype(components))
        latents = _up(noise) * sched.init_noise_sigma
        for i, t in enumerate(tqdm(sched.timesteps, desc=f"DFT {mode}", disable=not progress, leave=False)):
            if i < first:  # outside the last K steps: no gradient at all
                with torch.no_grad():
                    eps = _guided_eps(components, sched.scale_model_input(latents, t), t, context, guidance)
                    latents = sched.step(eps, t, latents).prev_sample
                continue
            x = latents.detach() if mode == "reference" else latents
            eps = _guided_eps(components, sched.scale_model_input(x, t), t, context, guidance)
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
    decode_chunk, progress,
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
    with _no_checkpointing(components.unet), torch.enable_grad():
        cond = encode_prompts(components, prompts, conditioning)
        # per tensor: with prefix tokens only the conditional branch carries them (the empty prompt has no prefix)
        leaf = Conditioning(cond.cond.detach().requires_grad_(cond.cond.requires_grad),
                            cond.uncond.detach().requires_grad_(cond.uncond.requires_grad))
        for s in tqdm(range(0, len(pairs), chunk), desc="DFT fast", disable=not progress, leave=False):
            ks = torch.tensor([p[0] for p in pairs[s : s + chunk]])
            bs = torch.tensor([p[1] for p in pairs[s : s + chunk]])
            dev = traj.latents.device
            x = traj.latents[ks.to(dev), bs.to(dev)]
            t = timesteps[ks.to(timesteps.device)].to(dev)
            context = leaf.slice(bs.to(leaf.cond.device)).unet_context(_unet_dtype(components))
            eps = _guided_eps(components, x, t, context, guidance)
            w = weights[ks].to(device=eps.device, dtype=eps.dtype).view(-1, 1, 1, 1)
            surrogate = (w * g[bs.to(g.device)] * eps).sum()
            if surrogate.requires_grad:
                surrogate.backward()
        if cond.requires_grad:
            grads = [leaf.cond.grad, leaf.uncond.grad]
            live = [(o, gr) for o, gr in zip((cond.cond, cond.uncond), grads) if gr is not None and o.requires_grad]
            torch.autograd.backward([o for o, _ in live], [gr for _, gr in live])
    return loss.detach()
