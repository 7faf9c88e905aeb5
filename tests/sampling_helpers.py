"""Shared by the sampling tests (SD 1.5 and SDXL): the diffusers pipeline of some components, and a relative error."""

import torch

from common.models import diffusers_pipeline


def quiet_pipe(comps):
    """diffusers' pipeline (SD or SDXL) sharing `comps`, without its progress bar."""
    pipe = diffusers_pipeline(comps)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def rel_error(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """||a - b|| / ||b|| over every tensor of `b` (float64)."""
    num = sum(((a[k] - b[k]).double() ** 2).sum() for k in b).sqrt()
    return float(num / sum((v.double() ** 2).sum() for v in b.values()).sqrt())


def fixed_loss(n: int, size: int = 32, dtype=torch.float32):
    """A fixed random differentiable loss of `n` decoded `size` px images: linear + non-linear terms."""
    weight = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(7), dtype=dtype)
    return lambda img: (img * weight).sum() + 10 * (img**2).mean() + 0.1 * torch.sin(3 * img).sum()


def dft_grads(comps, params: dict[str, torch.Tensor], *args, **kw):
    """(loss, {name: gradient}) of one `dft_backward` call, the gradients cleared before it."""
    from common.sampling import dft_backward

    for p in params.values():
        p.grad = None
    loss = dft_backward(comps, *args, **kw)
    return loss, {k: p.grad.detach().clone() for k, p in params.items()}


def assert_fast_equals_reference_with_last_k(comps, params, prompts, noise, steps, loss_fn, tol: float = 1e-6):
    """fast == reference (relative error < `tol`), in full and with last_k=2, and last_k changes the gradient;
    returns (the rollout, the last_k=2 fast gradient) for further checks."""
    from common.sampling import sample

    roll = sample(comps, prompts, noise, steps, return_trajectory=True)
    _, g_ref = dft_grads(comps, params, prompts, noise, steps, loss_fn, mode="reference")
    _, g_fast = dft_grads(comps, params, prompts, noise, steps, loss_fn, mode="fast", rollout=roll, chunk=4)
    assert rel_error(g_fast, g_ref) < tol
    _, l_ref = dft_grads(comps, params, prompts, noise, steps, loss_fn, mode="reference", last_k=2)
    _, l_fast = dft_grads(comps, params, prompts, noise, steps, loss_fn, mode="fast", rollout=roll, last_k=2)
    assert rel_error(l_fast, l_ref) < tol and rel_error(l_ref, g_ref) > 1e-2
    return roll, l_fast


def pipeline_autograd_grads(comps, params, prompts, noise, steps, loss_fn, **call_kw) -> dict[str, torch.Tensor]:
    """The exact gradient of `loss_fn` through diffusers' own pipeline (its no_grad decorator unwrapped), padded
    conditioning, CFG 7.5, its [0, 1] images mapped to [-1, 1]."""
    pipe = quiet_pipe(comps)
    call = type(pipe).__call__
    while hasattr(call, "__wrapped__"):
        call = call.__wrapped__
    for p in params.values():
        p.grad = None
    with torch.enable_grad():
        images = call(pipe, prompts, latents=noise.clone(), output_type="pt", num_inference_steps=steps,
                      guidance_scale=7.5, **call_kw).images
        loss_fn(images * 2 - 1).backward()
    return {k: p.grad.clone() for k, p in params.items()}


def assert_rollout_matches_pipeline(comps, cond, noise, roll, steps: int, guidance: float, **embeds):
    """`roll` (sample with return_trajectory, from `noise`) against diffusers' pipeline fed the same pre-computed
    embeddings (`embeds`: prompt_embeds=..., and for SDXL the pooled ones and height / width): same images, and the
    stored trajectory equals the pipeline's per-step latents (callback). Tolerance 1e-5: the same fp32 operations,
    batched differently."""
    seen = []

    def grab(pipe, i, t, kw):
        seen.append(kw["latents"].clone())
        return kw

    ref = quiet_pipe(comps)(**embeds, latents=noise.clone(), output_type="pt", num_inference_steps=steps,
                            guidance_scale=guidance, callback_on_step_end=grab).images
    assert (roll.images - (ref * 2 - 1)).abs().max() < 1e-5
    traj = roll.trajectory
    assert traj.latents.shape == (steps, *noise.shape) and traj.eps.shape == traj.latents.shape
    assert torch.equal(traj.latents[0], noise)
    for k in range(steps - 1):
        assert (traj.latents[k + 1] - seen[k]).abs().max() < 1e-5
    assert (roll.latents - seen[-1]).abs().max() < 1e-5
