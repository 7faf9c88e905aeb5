"""Benchmark: adjusted DFT, `fast` (VJPs at the stored trajectory) vs `reference` (re-run the chain with hooks and
U-Net/VAE gradient checkpointing, as the authors), on the gradient of one training step.

Set-up: tiny SD-shaped components at a realistic batch (8 images of 64 px, 20 DPM-Solver++ steps, CFG 7.5) with a
somewhat larger U-Net than the test one (4 M parameters, cross-attention in every block) and LoRA (rank 8) on both the
text encoder and the U-Net; the loss is a fixed random linear + quadratic function of the decoded images. The no-grad
rollout with its trajectory is made once beforehand: a training step needs it in both forms (targets, face detection),
so it is not charged to either.

Figures (both forms measured side by side, alternately, in one process):
- `dft_ref_s`, `dft_fast_s`: wall time of one `dft_backward` call, the minimum over interleaved repeats (the machine
  is shared; the minimum is the least disturbed run). `dft_fast_speedup` = ref / fast.
- `dft_fast_speedup_cpu`: the same ratio from process CPU time (less sensitive to other processes).
Everything runs with ONE torch thread: on the shared 2-core machine, two OpenMP threads made the same rollout up to
80x slower (spin-waiting when the other core is busy), which would swamp the comparison.
- `dft_ref_peak_mib`, `dft_fast_peak_mib`: peak of live CPU tensor memory during the call, above what was live before
  it, from torch.profiler's allocator events (every allocation and free, time-ordered and summed; model weights and
  the stored trajectory are live before and not counted). `dft_fast_memory_ratio` = ref / fast.
- `dft_grad_rel_error`: ||g_fast - g_ref|| / ||g_ref|| over all LoRA tensors.
- `dft_fast_chunk`: (image, step) pairs per U-Net call in the fast form.
"""

from __future__ import annotations

import time

import torch

from common.models import TINY_UNET, tiny_components
from common.sampling import dft_backward, sample

IMAGES, STEPS, SIZE, CHUNK, REPEATS = 8, 20, 64, 8, 2


def build(seed: int = 0):
    """Tiny components with a 4 M-parameter cross-attention U-Net and rank-8 LoRA (random, non-zero) on TE and U-Net."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    comps = tiny_components(seed=seed, image_size=SIZE, text_dim=64)
    torch.manual_seed(seed)
    # the tiny U-Net twice as wide, with cross-attention in both blocks
    wide = dict(TINY_UNET, block_out_channels=(64, 128), down_block_types=("CrossAttnDownBlock2D",) * 2,
                up_block_types=("CrossAttnUpBlock2D",) * 2)
    comps.unet = UNet2DConditionModel(**wide, sample_size=SIZE // 8, cross_attention_dim=64).eval().requires_grad_(False)
    comps.text_encoder.add_adapter(
        LoraConfig(r=8, lora_alpha=8, init_lora_weights="gaussian",
                   target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"])
    )
    comps.unet.add_adapter(
        LoraConfig(r=8, lora_alpha=8, init_lora_weights="gaussian", target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    )
    params = [p for m in (comps.text_encoder, comps.unet) for p in m.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:  # lora_B starts at zero; random values make every tensor's gradient non-trivial
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return comps, params


def peak_tensor_mib(fn) -> float:
    """Peak of live CPU tensor bytes while `fn()` runs, relative to the start (torch.profiler allocator events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak / 2**20


def run() -> dict[str, float]:
    threads = torch.get_num_threads()
    try:
        return _run()
    finally:
        torch.set_num_threads(threads)


def _run() -> dict[str, float]:
    torch.set_num_threads(1)  # see the module docstring: two OpenMP threads on a shared 2-core machine spin-wait
    comps, params = build()
    prompts = ["A photo of the face of a doctor, a person"] * IMAGES
    gen = torch.Generator().manual_seed(1)
    noise = torch.randn(IMAGES, 4, SIZE // 8, SIZE // 8, generator=gen)
    weight = torch.randn(IMAGES, 3, SIZE, SIZE, generator=gen)

    def loss_fn(images):
        return (images * weight).mean() + 4 * (images**2).mean()

    rollout = sample(comps, prompts, noise, STEPS, return_trajectory=True)
    forms = {
        "ref": dict(mode="reference"),
        "fast": dict(mode="fast", rollout=rollout, chunk=CHUNK),
    }

    def call(name):
        for p in params:
            p.grad = None
        dft_backward(comps, prompts, noise, STEPS, loss_fn, **forms[name])
        return [p.grad.clone() for p in params]

    grads = {name: call(name) for name in forms}  # also the warm-up
    num = sum(((a - b) ** 2).sum() for a, b in zip(grads["fast"], grads["ref"])).sqrt()
    den = sum((b**2).sum() for b in grads["ref"]).sqrt()

    wall = {name: float("inf") for name in forms}
    cpu = dict(wall)
    for _ in range(REPEATS):
        for name in forms:
            t0, c0 = time.perf_counter(), time.process_time()
            call(name)
            wall[name] = min(wall[name], time.perf_counter() - t0)
            cpu[name] = min(cpu[name], time.process_time() - c0)
    peak = {name: peak_tensor_mib(lambda name=name: call(name)) for name in forms}
    return {
        "dft_ref_s": round(wall["ref"], 3),
        "dft_fast_s": round(wall["fast"], 3),
        "dft_fast_speedup": round(wall["ref"] / wall["fast"], 3),
        "dft_fast_speedup_cpu": round(cpu["ref"] / cpu["fast"], 3),
        "dft_ref_peak_mib": round(peak["ref"], 1),
        "dft_fast_peak_mib": round(peak["fast"], 1),
        "dft_fast_memory_ratio": round(peak["ref"] / peak["fast"], 3),
        "dft_grad_rel_error": float(num / den),
        "dft_fast_chunk": float(CHUNK),
    }


if __name__ == "__main__":
    import json

    t0 = time.time()
    print(json.dumps(run(), indent=2), f"({time.time() - t0:.0f} s)")
