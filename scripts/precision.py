"""How far the fast-DFT parameter gradient with frozen weights in fp16 / bf16 is from fp32, at true SD 1.5 size.

    python -m scripts.precision [--cache DIR] [--images 2] [--steps 2] [--size 64] [--out FILE]

The SD 1.5 stand-in of `make dryrun` (random weights at the real architecture, from its hub cache) gets rank-50 LoRA on
the text encoder and the U-Net with the SAME seeded non-zero values in every run; the same noise, prompt and denoising
steps; frozen weights (text encoder, U-Net, VAE) in the dtype under test, LoRA in fp32, as the trainer runs them. The
loss is the trainer's scale of a semantics term: w_img (8) x mean squared distance of each decoded image to a fixed
target image, summed over the images and divided by the per-process image count of exp-1 (12), which is what makes
the gradients that cross the fp16 VAE and U-Net small. Reported per LoRA group (text encoder, U-Net): relative error
||g - g32|| / ||g32||, cosine, and the share of exactly-zero entries where fp32 has none (underflow). With
`--loss-scale S` the surrogate is multiplied by S and the fp32 LoRA gradients divided by S (static loss scaling).
Random weights make the absolute gradient scale that of the stand-in, not of the real model: the comparison is between
dtypes on the same chain.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
N_LOCAL = 12  # exp-1: 24 images per prompt over 2 GPUs
W_IMG = 8.0


def grads(dtype, args, hub: Path) -> tuple[dict[str, torch.Tensor], float]:
    import os

    os.environ["HF_HUB_CACHE"] = str(hub)
    from common import adapters as ad
    from common.models import SD15, load_components
    from common.sampling import dft_backward, sample

    torch.manual_seed(0)
    comps = load_components(SD15, dtype=dtype, text_encoder_dtype=dtype)
    ad.add_lora(comps, True, True, 50)
    params = ad.trainable_parameters(comps)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name in sorted(params):
            p = params[name]
            p.copy_(torch.randn(p.shape, generator=g) * (0.02 if "lora_A" in name else 0.002))
    shape = comps.latent_shape(args.size)
    noise = torch.randn((args.images, *shape), generator=torch.Generator().manual_seed(2))
    target = torch.rand((1, 3, args.size, args.size), generator=torch.Generator().manual_seed(3)) * 2 - 1
    prompts = ["a photo of the face of a nurse, a person"] * args.images
    t0 = time.time()
    roll = sample(comps, prompts, noise, args.steps, return_trajectory=True)

    def loss_fn(images):
        per_image = W_IMG * ((images - target) ** 2).mean((1, 2, 3))
        return per_image.sum() / N_LOCAL * args.loss_scale

    for p in params.values():
        p.grad = None
    dft_backward(comps, prompts, noise, args.steps, loss_fn, mode="fast", rollout=roll)
    out = {k: (p.grad.detach().float() / args.loss_scale if p.grad is not None else torch.zeros_like(p, dtype=torch.float32))
           for k, p in params.items()}
    return out, time.time() - t0


def compare(g: dict, ref: dict) -> dict:
    res = {}
    for group, tag in (("text_encoder", "text_encoder."), ("unet", "unet.")):
        keys = [k for k in ref if k.startswith(tag)]
        a = torch.cat([g[k].reshape(-1) for k in keys]).double()
        b = torch.cat([ref[k].reshape(-1) for k in keys]).double()
        res[group] = {
            "rel_error": float((a - b).norm() / b.norm()),
            "cosine": float(torch.nn.functional.cosine_similarity(a, b, dim=0)),
            "underflow_share": float(((a == 0) & (b != 0)).double().mean()),
            "finite": bool(torch.isfinite(a).all()),
            "ref_norm": float(b.norm()),
        }
    return res


def main(argv=None) -> int:
    from scripts.dryrun import build_standins, default_cache

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", type=Path, default=None)
    ap.add_argument("--images", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--loss-scale", type=float, default=1.0)
    ap.add_argument("--dtypes", nargs="+", default=["bf16", "fp16"], choices=["bf16", "fp16"])
    ap.add_argument("--out", type=Path, default=Path("outputs/bench/precision.json"))
    a = ap.parse_args(argv)
    cache = a.cache or default_cache()
    build_standins(cache)
    ref, t32 = grads(torch.float32, a, cache / "hub")
    rows = {"fp32": {"seconds": round(t32, 1)}}
    for name in a.dtypes:
        g, t = grads(DTYPES[name], a, cache / "hub")
        rows[name] = {"seconds": round(t, 1), **compare(g, ref)}
        print(f"[precision] {name}: {json.dumps(rows[name])}", flush=True)
    lines = ["| frozen weights | LoRA group | rel. error vs fp32 | cosine | underflow share | seconds |",
             "|---|---|---|---|---|---|"]
    for name in a.dtypes:
        for group in ("text_encoder", "unet"):
            r = rows[name][group]
            lines.append(f"| {name} | {group} | {r['rel_error']:.3g} | {r['cosine']:.6f} | {r['underflow_share']:.3g} | "
                         f"{rows[name]['seconds']} |")
    print("\n".join(lines))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"settings": {"images": a.images, "steps": a.steps, "size": a.size, "n_local": N_LOCAL,
                                              "w_img": W_IMG, "loss_scale": a.loss_scale, "rank": 50},
                                 "rows": rows, "table": "\n".join(lines)}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
