"""Sampling and adjusted DFT on tiny components.

Oracles: diffusers' own StableDiffusionPipeline (padded conditioning, pre-computed embeddings, the per-step latents
through its callback, and its exact gradient when run with autograd), the text encoder run on hand-built token /
position inputs, c_t from a hand-built beta table and docs/method.md#reference-numbers, the DDIM closed form and finite
differences for the solver scalars, and the `reference` (hooked chain) form for the `fast` one.
"""

import math

import pytest
import torch
from sampling_helpers import (
    assert_fast_equals_reference_with_last_k,
    assert_rollout_matches_pipeline,
    dft_grads,
    fixed_loss,
    pipeline_autograd_grads,
    quiet_pipe,
    rel_error,
)

from common.models import make_scheduler
from common.sampling import (
    Conditioning,
    Rollout,
    decode,
    dft_backward,
    dft_coefficients,
    encode_prompts,
    sample,
    solver_coefficients,
)

PROMPT = "A photo of the face of a doctor, a person"
SIZE = 32  # 32 px images, 4x4 latents: the smallest size the tiny VAE (down-sampling 8) handles well





def _add_trainables(comps, case: str, seed: int = 1):
    """LoRA through peft directly (adapters.py is built in parallel) with random lora_B, so that every tensor,
    lora_A included, gets a non-zero gradient; `prefix` makes the token-embedding table trainable instead."""
    from peft import LoraConfig

    if case in ("unet", "both"):
        comps.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                          target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    if case in ("te", "both"):
        comps.text_encoder.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                                  target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1",
                                                                  "fc2"]))
    if case == "prefix":
        comps.prompt_prefix = "sks zwx "
        comps.text_encoder.get_input_embeddings().weight.requires_grad_(True)
    gen = torch.Generator().manual_seed(seed)
    for m in (comps.text_encoder, comps.unet):
        for name, p in m.named_parameters():
            if "lora_B" in name:
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return {f"{m}.{n}": p for m in ("text_encoder", "unet")
            for n, p in getattr(comps, m).named_parameters() if p.requires_grad}



# ----------------------------------------------------------------------------------------------------------------
# Conditioning and sampling
# ----------------------------------------------------------------------------------------------------------------


def test_padded_sample_matches_diffusers_pipeline(make_tiny):
    """`padded` = StableDiffusionPipeline (77 tokens, no mask for SD 1.x, "" negative, CFG 7.5). Tolerance 1e-5:
    identical fp32 operations, only batching can reorder sums (observed ~1e-7)."""
    comps = make_tiny(seed=0, image_size=SIZE)
    prompts = ["a photo of a cat", PROMPT]
    noise = torch.randn(2, 4, SIZE // 8, SIZE // 8)
    ours = sample(comps, prompts, noise, 6, conditioning="padded")
    ref = quiet_pipe(comps)(prompts, latents=noise.clone(), output_type="pt", num_inference_steps=6, guidance_scale=7.5)
    assert ours.images.shape == (2, 3, SIZE, SIZE)
    assert (ours.images - (ref.images * 2 - 1)).abs().max() < 1e-5


def test_reference_sample_and_trajectory_match_pipeline(make_tiny):
    """`reference` conditioning fed to the pipeline as pre-computed embeddings gives the same images, and the stored
    trajectory equals the pipeline's per-step latents (callback) and its U-Net outputs. Tolerance 1e-5 as above."""
    comps = make_tiny(seed=1, image_size=SIZE)
    noise = torch.randn(3, 4, SIZE // 8, SIZE // 8)
    steps = 5
    roll = sample(comps, [PROMPT] * 3, noise, steps, guidance=5.0, return_trajectory=True)
    cond = encode_prompts(comps, [PROMPT] * 3)
    assert_rollout_matches_pipeline(comps, cond, noise, roll, steps, 5.0, prompt_embeds=cond.cond,
                                    negative_prompt_embeds=cond.uncond.contiguous())
    traj = roll.trajectory
    assert traj.timesteps.tolist() == comps.scheduler.timesteps.tolist()
    with torch.no_grad():  # guided eps of step 2 recomputed by hand
        x = traj.latents[2]
        ctx = torch.cat([cond.uncond, cond.cond])
        out = comps.unet(torch.cat([x, x]), traj.timesteps[2], encoder_hidden_states=ctx).sample
        u, c = out.chunk(2)
        assert (traj.eps[2] - (u + 5.0 * (c - u))).abs().max() < 1e-5


def test_reference_conditioning_lengths_and_masks(make_tiny):
    """Prompt at its real length; "" padded to it; each masked pad row j equals a 3-token [BOS, EOS, pad] sequence at
    positions (0, 1, j) whose pad key is masked (all that row j may see: the causal mask hides later tokens, the key
    mask the other pads); without the mask the pad rows differ. Tolerance 1e-5 (fp32 attention)."""
    comps = make_tiny(seed=0, image_size=SIZE)
    tok, te = comps.tokenizer, comps.text_encoder
    ids = tok(PROMPT).input_ids
    length = len(ids)
    with torch.no_grad():
        ref = encode_prompts(comps, [PROMPT, PROMPT])
        unmasked = encode_prompts(comps, [PROMPT], "reference_unmasked")
        padded = encode_prompts(comps, [PROMPT], "padded")
        solo = te(torch.tensor([ids]))[0]
        assert ref.cond.shape == (2, length, 32) and padded.cond.shape == (1, 77, 32)
        assert (ref.cond[1] - solo[0]).abs().max() < 1e-5
        bos, eos = tok.bos_token_id, tok.eos_token_id
        for j in (2, length - 1):
            probe = te(torch.tensor([[bos, eos, eos]]), position_ids=torch.tensor([[0, 1, j]]),
                       attention_mask=torch.tensor([[1, 1, 0]]))[0]
            assert (ref.uncond[0, j] - probe[0, 2]).abs().max() < 1e-5
        assert (ref.uncond[0, :2] - probe[0, :2]).abs().max() < 1e-5
        full = te(torch.tensor([[bos, eos] + [eos] * (length - 2)]))[0]  # the unmasked variant: no mask at all
        assert (unmasked.uncond[0] - full[0]).abs().max() < 1e-5
        assert (ref.uncond[0, 2:] - full[0, 2:]).abs().max() > 1e-3  # the mask matters for pad rows
        comps.prompt_prefix = "sks "
        pre = encode_prompts(comps, ["a cat"])
        assert (pre.cond[0] - te(torch.tensor([tok("sks a cat").input_ids]))[0][0]).abs().max() < 1e-5


def test_shared_unet_batch_and_chunking_match_separate_rollouts(make_tiny):
    """Conditioning.cat of two models' conditionings in one call = two calls; batch_size chunking = one chunk.
    Tolerance 1e-5 (relative for the latents, whose scale is ~30): only the U-Net batch composition differs."""
    comps = make_tiny(seed=2, image_size=SIZE)
    noise = torch.randn(2, 4, SIZE // 8, SIZE // 8)
    with torch.no_grad():
        a = encode_prompts(comps, ["a cat", "a dog"])
        b = encode_prompts(comps, ["a car", "a hat"])
    both = sample(comps, Conditioning.cat([a, b]), noise.repeat(2, 1, 1, 1), 4, return_trajectory=True,
                  batch_size=3)
    ra, rb = sample(comps, a, noise, 4), sample(comps, b, noise, 4)
    assert (both.images - torch.cat([ra.images, rb.images])).abs().max() < 1e-5
    assert (both.slice(slice(2, 4)).latents - rb.latents).abs().max() < 1e-5 * rb.latents.abs().max()
    assert both.trajectory.latents.shape[:2] == (4, 4)
    assert (decode(comps, both.latents) - both.images).abs().max() < 1e-5
    with pytest.raises(ValueError, match="sequence lengths"):
        Conditioning.cat([a, encode_prompts(comps, [PROMPT, PROMPT])])


# ----------------------------------------------------------------------------------------------------------------
# Coefficients
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps,raw_last,norm_last", [(19, 198.0, 3.22), (25, 182.7, 2.91)])
def test_dft_coefficients_match_appendix_a(steps, raw_last, norm_last):
    """docs/method.md#reference-numbers: raw c 5.675 at t=999, 198 at t=53 / 182.7 at t=40; normalised first ~0.09,
    last 3.22 / 2.91.
    Also equal to c_t from an fp64 beta table built by hand (SD's scaled-linear betas); tolerance 1e-4 relative
    because the scheduler stores alphas = 1 - betas in fp32 (observed 9e-6)."""
    sched = make_scheduler()
    sched.set_timesteps(steps)
    t = sched.timesteps
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    abar = torch.cumprod(1 - betas, 0)
    raw = (abar[t] * (1 - abar[t])).sqrt() / betas[t]
    assert raw[0].item() == pytest.approx(5.675, abs=1e-3) and raw[-1].item() == pytest.approx(raw_last, abs=0.1)
    c = dft_coefficients(sched, t)
    assert torch.allclose(c, raw / raw.log().mean().exp(), rtol=1e-4)
    assert c[0].item() == pytest.approx(0.09, abs=0.005) and c[-1].item() == pytest.approx(norm_last, abs=0.005)
    assert c.log().sum().abs() < 1e-9  # geometric mean 1
    last = dft_coefficients(sched, t[-4:])  # last_k: normalised over the steps used
    assert torch.allclose(last, raw[-4:] / raw[-4:].log().mean().exp(), rtol=1e-4)


def test_solver_coefficients_ddim_closed_form():
    """First-order DPM-Solver++ is DDIM: z_prev = sqrt(abar_p / abar) z + (sqrt(1 - abar_p) - sqrt(abar_p (1 - abar)
    / abar)) eps, so k_t = A_t * prod of the later z-coefficients (the last step goes to t = 0's abar, sigma_min).
    Tolerance 1e-5 relative: the scheduler keeps fp32 tables."""
    sched = make_scheduler(solver_order=1)
    k = solver_coefficients(sched, 7)
    sched.set_timesteps(7)
    abar = sched.alphas_cumprod.double()
    ts = sched.timesteps.tolist() + [0]
    a = [abar[t] for t in ts]
    z_coef = [(a[i + 1] / a[i]).sqrt() for i in range(7)]
    eps_coef = [(1 - a[i + 1]).sqrt() - (a[i + 1] * (1 - a[i]) / a[i]).sqrt() for i in range(7)]
    expected = torch.stack([eps_coef[i] * math.prod(z_coef[i + 1 :]) for i in range(7)])
    assert torch.allclose(k, expected, rtol=1e-5, atol=1e-7)


def test_solver_coefficients_match_finite_differences():
    """2nd-order multistep (the project's solver): the map eps -> z_0 is linear, so a unit change of eps_t in a
    no-grad rollout changes z_0 by exactly k_t. Tolerance 1e-5 (fp32 scheduler arithmetic on O(1) values)."""
    sched = make_scheduler()
    steps = 19
    k = solver_coefficients(sched, steps)
    eps = torch.randn(steps, 1)

    def final(e):
        sched.set_timesteps(steps)
        z = torch.full((1,), 0.7)
        for i, t in enumerate(sched.timesteps):
            z = sched.step(e[i], t, z).prev_sample
        return z.item()

    base = final(eps)
    for i in (0, 5, 17, 18):
        bumped = eps.clone()
        bumped[i] += 1.0
        assert final(bumped) - base == pytest.approx(k[i].item(), abs=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# Adjusted DFT
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case,chunk", [("te", 4), ("unet", 3), ("both", 16), ("prefix", 1)])
def test_fast_equals_reference(make_tiny, case, chunk):
    """fast (VJPs at the stored trajectory) == reference (hooked chain with checkpointing) for every trainable case,
    fp32, relative error < 1e-4 (the issue's bound; observed ~5e-7). Every trainable tensor gets a non-zero gradient."""
    comps = make_tiny(seed=3, image_size=SIZE)
    params = _add_trainables(comps, case)
    prompts, steps = [PROMPT] * 3, 5
    noise = torch.randn(3, 4, SIZE // 8, SIZE // 8)
    loss_fn = fixed_loss(3, SIZE)
    loss_r, g_ref = dft_grads(comps, params, prompts, noise, steps, loss_fn, mode="reference")
    roll = sample(comps, prompts, noise, steps, return_trajectory=True, decode=case != "te")
    loss_f, g_fast = dft_grads(comps, params, prompts, noise, steps, loss_fn, mode="fast", rollout=roll, chunk=chunk,
                            decode_chunk=2)
    assert loss_f.item() == pytest.approx(loss_r.item(), rel=1e-5)
    assert rel_error(g_fast, g_ref) < 1e-4
    zero = [k for k in params if g_ref[k].abs().max() == 0 or g_fast[k].abs().max() == 0]
    if case == "prefix":  # only the rows of tokens that were used get gradient, including the prefix ones
        (table,) = params
        used = g_ref[table].abs().sum(1).nonzero().flatten().tolist()
        assert set(comps.tokenizer("sks zwx " + PROMPT).input_ids) <= set(used)
    else:
        assert not zero, f"zero gradient for {zero[:5]}"


def test_fast_equals_reference_fp64_last_k_and_accumulates(make_tiny):
    """fp64 (both LoRAs): relative error < 1e-6 (observed ~2e-8; the scheduler's fp32 step bounds it); with
    last_k=2 the two forms also agree and differ from the full gradient; `.grad` accumulates across calls."""
    comps = make_tiny(seed=4, image_size=SIZE)
    for m in (comps.text_encoder, comps.unet, comps.vae):
        m.to(torch.float64)
    params = _add_trainables(comps, "both")
    prompts, steps = [PROMPT] * 2, 5
    noise = torch.randn(2, 4, SIZE // 8, SIZE // 8, dtype=torch.float64)
    loss_fn = fixed_loss(2, SIZE, torch.float64)
    roll, l_fast = assert_fast_equals_reference_with_last_k(comps, params, prompts, noise, steps, loss_fn)
    dft_backward(comps, prompts, noise, steps, loss_fn, mode="fast", rollout=roll, last_k=2)  # on top of l_fast
    assert rel_error({k: p.grad / 2 for k, p in params.items()}, l_fast) < 1e-12


def test_naive_equals_autograd_through_diffusers_pipeline(make_tiny):
    """naive = the exact gradient: diffusers' pipeline run with autograd on (its no_grad decorator unwrapped), padded
    conditioning, the same loss on its [0, 1] images mapped to [-1, 1]. Tolerance 1e-4 relative (observed ~1e-6)."""
    comps = make_tiny(seed=5, image_size=SIZE)
    params = _add_trainables(comps, "both")
    prompts, steps = ["a photo of a cat", PROMPT], 4
    noise = torch.randn(2, 4, SIZE // 8, SIZE // 8)
    loss_fn = fixed_loss(2, SIZE)
    _, g_naive = dft_grads(comps, params, prompts, noise, steps, loss_fn, mode="naive", conditioning="padded")
    g_pipe = pipeline_autograd_grads(comps, params, prompts, noise, steps, loss_fn)
    assert rel_error(g_naive, g_pipe) < 1e-4
    roll = sample(comps, prompts, noise, steps, conditioning="padded", return_trajectory=True)
    _, g_fast = dft_grads(comps, params, prompts, noise, steps, loss_fn, mode="fast", rollout=roll,
                       conditioning="padded")
    assert rel_error(g_fast, g_naive) > 1e-2  # adjusted != exact


def test_reference_checkpointing_is_nonreentrant_and_reaches_every_unet_lora(make_tiny, monkeypatch):
    """The zero-gradient trap: U-Net-only LoRA with detached U-Net inputs under reentrant checkpointing gets no
    gradient. The reference form must checkpoint non-reentrantly (spied), give every LoRA tensor a non-zero gradient,
    and restore the modules' checkpointing state."""
    import torch.utils.checkpoint as ckpt

    comps = make_tiny(seed=6, image_size=SIZE)
    targets = [n for n, _ in comps.unet.named_modules() if n.endswith(("to_q", "to_k", "to_v", "to_out.0"))]
    params = _add_trainables(comps, "unet")
    calls = []
    real = ckpt.checkpoint

    def spy(fn, *args, **kw):
        calls.append(kw.get("use_reentrant"))
        return real(fn, *args, **kw)

    monkeypatch.setattr(ckpt, "checkpoint", spy)
    noise = torch.randn(2, 4, SIZE // 8, SIZE // 8)
    _, grads = dft_grads(comps, params, [PROMPT] * 2, noise, 3, fixed_loss(2, SIZE), mode="reference")
    assert calls and set(calls) == {False}
    assert len(grads) == 2 * len(targets) > 0  # lora_A and lora_B of every target layer
    assert all(g.abs().max() > 0 for g in grads.values())
    assert not comps.unet.is_gradient_checkpointing and not comps.vae.is_gradient_checkpointing


def test_fast_with_unet_checkpointing_recomputes_and_keeps_the_gradient(make_tiny, monkeypatch):
    """checkpointing=True (sampling.unet_checkpointing): the fast form's U-Net VJPs run under non-reentrant
    checkpointing (spied) and give the gradient of the form without it (fp32, relative error < 1e-6: the same
    operations recomputed); the modules' checkpointing state is restored."""
    import torch.utils.checkpoint as ckpt

    comps = make_tiny(seed=4, image_size=SIZE)
    params = _add_trainables(comps, "both")
    prompts, steps = [PROMPT] * 2, 4
    noise = torch.randn(2, 4, SIZE // 8, SIZE // 8)
    roll = sample(comps, prompts, noise, steps, return_trajectory=True)
    _, plain = dft_grads(comps, params, prompts, noise, steps, fixed_loss(2, SIZE), mode="fast", rollout=roll, chunk=3)
    calls, real = [], ckpt.checkpoint

    def spy(fn, *args, **kw):
        calls.append(kw.get("use_reentrant"))
        return real(fn, *args, **kw)

    monkeypatch.setattr(ckpt, "checkpoint", spy)
    _, recomputed = dft_grads(comps, params, prompts, noise, steps, fixed_loss(2, SIZE), mode="fast", rollout=roll, chunk=3,
                           checkpointing=True)
    assert calls and set(calls) == {False}
    assert rel_error(recomputed, plain) < 1e-6
    assert not comps.unet.is_gradient_checkpointing


def test_bad_inputs_say_what_is_wrong(make_tiny):
    comps = make_tiny(seed=0, image_size=SIZE)
    noise = torch.randn(2, 4, SIZE // 8, SIZE // 8)
    with pytest.raises(ValueError, match="conditioning="):
        encode_prompts(comps, ["a"], conditioning="short")
    with pytest.raises(ValueError, match="at most 77"):
        encode_prompts(comps, ["word " * 80])
    with pytest.raises(ValueError, match="B = 3"):
        sample(comps, ["a"] * 3, noise, 2)
    with pytest.raises(ValueError, match="nothing to train"):
        dft_backward(comps, ["a", "b"], noise, 2, lambda x: x.sum())
    _add_trainables(comps, "te")
    with pytest.raises(ValueError, match="mode="):
        dft_backward(comps, ["a", "b"], noise, 2, lambda x: x.sum(), mode="exact")
    with pytest.raises(ValueError, match="return_trajectory=True"):
        dft_backward(comps, ["a", "b"], noise, 2, lambda x: x.sum(), mode="fast", rollout=Rollout(None, noise))
    roll = sample(comps, ["a", "b"], noise, 2, return_trajectory=True, decode=False)
    with pytest.raises(ValueError, match="not generated from this `noise`"):
        dft_backward(comps, ["a", "b"], noise + 1, 2, lambda x: x.sum(), mode="fast", rollout=roll)
    with pytest.raises(ValueError, match="expected 3"):
        dft_backward(comps, ["a", "b"], noise, 3, lambda x: x.sum(), mode="fast", rollout=roll)
    for mode in ("reference", "fast"):  # a loss with no path to the images adds nothing (and does not fail)
        assert dft_backward(comps, ["a", "b"], noise, 2, lambda x: torch.tensor(0.5), mode=mode, rollout=roll) == 0.5
        assert all(p.grad is None for p in comps.text_encoder.parameters())
    with pytest.raises(ValueError, match="last_k"):
        dft_backward(comps, ["a", "b"], noise, 2, lambda x: x.sum(), last_k=3, rollout=roll)
