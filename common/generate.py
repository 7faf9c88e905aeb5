"""Generate test images from a base model, optionally with debiasing adapters, reproducibly and resumably.

    python -m common.generate --model stable-diffusion-v1-5/stable-diffusion-v1-5 --lora outputs/exp-3/export \
        --prompts occupation.json:test --images-per-prompt 160 --out outputs/exp-3/images

Noise: image j of a prompt starts from `torch.randn(latent_shape, generator=manual_seed(stable_seed(prompt, j, seed)))`
on the CPU in fp32, where `stable_seed` hashes (seed, j, prompt) with SHA-256. So image j of a prompt is the same for
every `--images-per-prompt`, in every run and on every machine, and the original and the debiased model are compared
on the same noise. (The authors seeded with Python's `hash(prompt)`, which changes with every process.)
Conditioning as the authors: the prompt at its real token length with the masked empty prompt ("reference");
"reference_unmasked" when prefix tokens are loaded (their exp-2 path). Prompts of equal token length are batched
together (never padded, which would change what the U-Net attends to). Output: `OUT/prompt_{i}/img_{j}.png` (lossless
by default; `--format jpg` for the authors' format) and `OUT/manifest.json`. Existing images are skipped, so an
interrupted or extended run resumes; a run whose settings differ from the manifest's is refused.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from common.config import SD15
from common.models import DTYPES, resolve_dtype
from common.plots import to_pil

DEFAULT_SEED = 1997
FORMATS = ("png", "jpg")
MANIFEST = "manifest.json"
IDENTITY_KEYS = ("model", "adapters", "prompts", "steps", "guidance", "seed", "image_size", "conditioning", "dtype")
"""manifest entries that must match for a resumed run (images of different settings must not mix)"""


# ----------------------------------------------------------------------------------------------------------------
# Noise
# ----------------------------------------------------------------------------------------------------------------


def stable_seed(prompt: str, index: int, base: int = DEFAULT_SEED) -> int:
    """Seed of image `index` of `prompt`: the first 63 bits of SHA-256("{base}|{index}|{prompt}"). Stable across
    processes, machines and Python versions (never Python's salted `hash()`)."""
    digest = hashlib.sha256(f"{int(base)}|{int(index)}|{prompt}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def noise_for(prompt: str, indices: Sequence[int], shape: Sequence[int], base: int = DEFAULT_SEED) -> torch.Tensor:
    """Initial noise of images `indices` of `prompt`: fp32 CPU Tensor[len(indices), *shape] (shape = the latent
    [4, h, w]); row k depends only on (prompt, indices[k], base)."""
    rows = []
    for j in indices:
        g = torch.Generator(device="cpu").manual_seed(stable_seed(prompt, j, base))
        rows.append(torch.randn(tuple(shape), generator=g, dtype=torch.float32))
    return torch.stack(rows) if rows else torch.zeros((0, *shape))


# ----------------------------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------------------------


def default_conditioning(components) -> str:
    """"reference_unmasked" when prefix tokens are loaded (the authors' exp-2 path), "reference" otherwise."""
    return "reference_unmasked" if components.prompt_prefix else "reference"


def _token_length(components, prompt: str) -> int:
    return len(components.tokenizer(components.prompt_prefix + prompt).input_ids)


def iter_generate(
    components,
    prompts: Sequence[str],
    indices: int | Sequence[int],
    *,
    steps: int = 30,
    guidance: float = 7.5,
    seed: int = DEFAULT_SEED,
    batch_size: int = 10,
    conditioning: str | None = None,
    image_size: int | None = None,
    skip: Callable[[int, int], bool] | None = None,
    progress: bool = True,
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Yield `(prompt position i, image index j, image [3, H, W] in [-1, 1] fp32 CPU)` for every prompt and index.

    `indices`: a count n (0..n-1) or explicit image indices, the same for every prompt; `skip(i, j)` True leaves an
    image out (resuming). Batches hold up to `batch_size` images of prompts with the same token length (several
    prompts per batch; each prompt is encoded once). `conditioning` defaults to `default_conditioning`.
    """
    from common.sampling import Conditioning, encode_prompts, sample

    idx = list(range(indices)) if isinstance(indices, int) else [int(j) for j in indices]
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    mode = conditioning or default_conditioning(components)
    shape = components.latent_shape(image_size)
    jobs = [(i, j) for i in range(len(prompts)) for j in idx if not (skip and skip(i, j))]
    if not jobs:
        return
    length = {i: _token_length(components, prompts[i]) for i in {i for i, _ in jobs}}
    jobs.sort(key=lambda ij: (length[ij[0]], ij[0], ij[1]))  # stable: prompt-major within a token length
    batches, current = [], []
    for job in jobs:
        if current and (len(current) == batch_size or length[current[-1][0]] != length[job[0]]):
            batches.append(current)
            current = []
        current.append(job)
    batches.append(current)

    cache: dict[int, Conditioning] = {}
    bar = tqdm(total=len(jobs), desc="generating", unit="img", disable=not progress)
    device = components.device
    with torch.no_grad():
        for batch in batches:
            for i in {i for i, _ in batch} - set(cache):
                side = shape[-1] * components.vae_factor  # SDXL conditions on the image size (SD 1.x ignores it)
                cache[i] = encode_prompts(components, [prompts[i]], mode, image_size=side)
            cond = Conditioning.cat([cache[i] for i, _ in batch])
            noise = torch.cat([noise_for(prompts[i], [j], shape, seed) for i, j in batch]).to(device)
            images = sample(components, cond, noise, steps, guidance=guidance).images.float().cpu()
            for (i, j), img in zip(batch, images):
                yield i, j, img
            bar.update(len(batch))
    bar.close()


def generate(components, prompts: Sequence[str], indices: int | Sequence[int], **kw) -> torch.Tensor:
    """All images in memory: Tensor[len(prompts), len(indices), 3, H, W] in [-1, 1] (fp32, CPU). Keyword arguments
    as `iter_generate` (without `skip`). For validation sets and tests; the CLI streams to disk instead."""
    idx = list(range(indices)) if isinstance(indices, int) else list(indices)
    out: dict[tuple[int, int], torch.Tensor] = {}
    for i, j, img in iter_generate(components, prompts, idx, **kw):
        out[(i, j)] = img
    if not out:
        raise ValueError("generate: no prompts or no image indices")
    return torch.stack([torch.stack([out[(i, j)] for j in idx]) for i in range(len(prompts))])


def image_path(out_dir: str | Path, i: int, j: int, fmt: str = "png") -> Path:
    return Path(out_dir) / f"prompt_{i}" / f"img_{j}.{fmt}"


def _save(img: Image.Image, path: Path, fmt: str) -> None:
    """Atomic write (temporary file, then rename): an interrupted run never leaves a truncated image behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    if fmt == "jpg":
        img.save(tmp, format="JPEG", quality=95)
    else:
        img.save(tmp, format="PNG")
    os.replace(tmp, path)


def _read_manifest(out: Path) -> dict | None:
    f = out / MANIFEST
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{f}: not valid JSON ({e}); delete it or choose another --out") from None


def _write_manifest(out: Path, manifest: dict) -> None:
    tmp = out / f".{MANIFEST}.tmp{os.getpid()}"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, out / MANIFEST)


def check_manifest(out_dir: str | Path, settings: dict) -> None:
    """Refuse to add images to `out_dir` when its manifest records other values for any `IDENTITY_KEYS` entry present
    in `settings` (images of different settings must not mix). No manifest: nothing to check."""
    out = Path(out_dir)
    old = _read_manifest(out)
    if old is None:
        return
    for key in IDENTITY_KEYS:
        if key in settings and old.get(key) != settings[key]:
            raise ValueError(
                f"{out / MANIFEST}: these images were generated with {key} = {json.dumps(old.get(key))[:200]}, "
                f"not {json.dumps(settings[key])[:200]}; choose another --out (images of different settings must "
                "not mix)"
            )


def generate_to_dir(
    components,
    prompts: Sequence[str],
    out_dir: str | Path,
    images_per_prompt: int,
    *,
    steps: int = 30,
    guidance: float = 7.5,
    seed: int = DEFAULT_SEED,
    batch_size: int = 10,
    fmt: str = "png",
    image_size: int | None = None,
    conditioning: str | None = None,
    info: dict | None = None,
    progress: bool = True,
) -> dict:
    """Write `prompt_{i}/img_{j}.{fmt}` for j < images_per_prompt, skipping images already there, plus the manifest
    (model, adapters, prompts, seeds, steps, guidance, ...; `info` adds entries, e.g. {"model": ..., "adapters": ...}).
    Refuses an `out_dir` whose manifest was written with other settings (`IDENTITY_KEYS`). Returns the manifest."""
    if fmt not in FORMATS:
        raise ValueError(f"format '{fmt}': expected one of {FORMATS}")
    if images_per_prompt < 1:
        raise ValueError(f"images_per_prompt must be >= 1, got {images_per_prompt}")
    out = Path(out_dir)
    mode = conditioning or default_conditioning(components)
    manifest = {
        "model": components.name,
        "adapters": None,
        **(info or {}),
        "prompts": list(prompts),
        "steps": int(steps),
        "guidance": float(guidance),
        "seed": int(seed),
        "image_size": int(components.latent_shape(image_size)[-1] * components.vae_factor),
        "conditioning": mode,
        "prompt_prefix": components.prompt_prefix,
        "dtype": str(components.dtype).removeprefix("torch."),
        "format": fmt,
        "noise": "torch.randn([4, h, w], generator=torch.Generator('cpu').manual_seed(seeds[i][j])), fp32",
    }
    old = _read_manifest(out)
    if old is not None:
        check_manifest(out, manifest)
        if old.get("format", fmt) != fmt:
            raise ValueError(f"{out / MANIFEST}: images are stored as {old.get('format')}, not {fmt}; pass "
                             f"--format {old.get('format')}")
    n = max(int(images_per_prompt), int(old.get("images_per_prompt", 0)) if old else 0)
    manifest["images_per_prompt"] = n
    manifest["seeds"] = {str(i): [stable_seed(p, j, seed) for j in range(n)] for i, p in enumerate(prompts)}
    manifest["complete"] = False
    out.mkdir(parents=True, exist_ok=True)
    _write_manifest(out, manifest)
    t0 = time.time()
    done = 0
    for i, j, img in iter_generate(
        components, prompts, images_per_prompt, steps=steps, guidance=guidance, seed=seed, batch_size=batch_size,
        conditioning=mode, image_size=image_size, skip=lambda i, j: image_path(out, i, j, fmt).is_file(),
        progress=progress,
    ):
        _save(to_pil(img), image_path(out, i, j, fmt), fmt)
        done += 1
    manifest["complete"] = all(image_path(out, i, j, fmt).is_file() for i in range(len(prompts)) for j in range(n))
    manifest["generated_this_run"] = done
    manifest["seconds_this_run"] = round(time.time() - t0, 2)
    _write_manifest(out, manifest)
    return manifest


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------


def load_adapters(components, lora: str | None = None, released: Sequence[str] | None = None,
                  prefix: str | None = None, ema: bool = True) -> dict | None:
    """Apply at most one kind of adapter (`common.adapters`): an exported folder/file (`load_lora`), the authors'
    released .pth files (`load_released`), or prefix-token embeddings (`load_textual_inversion`). An adapter of the
    other model family (an SDXL export for an SD 1.x model, SD 1.x or released files for SDXL) is refused with one
    sentence naming both models. Returns a JSON-able description for the manifest (None: the original model)."""
    from common import adapters

    given = [k for k, v in (("--lora", lora), ("--released", released), ("--prefix", prefix)) if v]
    if len(given) > 1:
        raise ValueError(f"pass one of {', '.join(given)}: they are alternative sources of the debiasing weights")
    if lora:
        return {"kind": "lora", "path": str(Path(lora).resolve()), **_jsonable(adapters.load_lora(components, lora))}
    if released:
        adapters.check_released_target(components, released[0])
        summary = adapters.load_released(list(released), components, ema=ema)
        return {"kind": "released", "ema": ema, **_jsonable(summary)}
    if prefix:
        tokens = adapters.load_textual_inversion(components, prefix)
        return {"kind": "prefix", "path": str(Path(prefix).resolve()), "tokens": tokens}
    return None


def _jsonable(d: dict) -> dict:
    return json.loads(json.dumps(d, default=str))


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m common.generate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=SD15,
                    help="hub id or local diffusers folder (SD 1.x or SDXL), or a registered model source (toy, tiny, tiny-sdxl)")
    src = ap.add_argument_group("debiasing weights (at most one; none = the original model)")
    src.add_argument("--lora", help="folder or file from `python -m common.export` (LoRA and/or prefix tokens)")
    src.add_argument("--released", nargs="+", metavar="PATH",
                     help="the authors' exported .pth files or their folder (text_encoder_lora_EMA.pth, ...)")
    src.add_argument("--prefix", help="prefix-token embeddings (learned_embeds-*.safetensors file or folder; SDXL: "
                     "learned_embeds_sdxl.safetensors)")
    src.add_argument("--no-ema", action="store_true", help="with --released folders: the non-EMA files")
    ap.add_argument("--prompts", required=True, action="append",
                    help="FILE[:SPLIT]: occupation.json:test, a key of the JSON, or a .txt with one prompt per line; "
                         "repeat to concatenate sets")
    ap.add_argument("--images-per-prompt", type=int, default=60)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--batch-size", type=int, default=10)
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED, help="base of the per-(prompt, index) seeds")
    ap.add_argument("--dtype", choices=["auto", *sorted(DTYPES)],
                    help="weights dtype (default auto: bf16 on a GPU that supports it, else fp16; fp32 on CPU)")
    ap.add_argument("--format", choices=FORMATS, default="png")
    ap.add_argument("--image-size", type=int, help="default: the model's native size (512 for SD 1.5)")
    ap.add_argument("--device", default=None, help="default: cuda when available; cpu only with --cpu (or for toy/tiny)")
    ap.add_argument("--cpu", action="store_true", help="allow a real model to run on the CPU when no usable CUDA is found")
    ap.add_argument("--limit-prompts", type=int, help="only the first N prompts (quick checks)")
    return ap


def main(argv: Sequence[str] | None = None) -> dict:
    from common.models import load_components
    from common.prompts import load_prompt_sets
    from common.runtime import enable_tf32, require_device

    args = build_parser().parse_args(argv)
    device = require_device(args.model, args.cpu, "pass --cpu (or --device cpu)", args.device)
    enable_tf32()
    dtype = resolve_dtype(args.dtype, device)
    prompts = load_prompt_sets(args.prompts, cwd=True)[: args.limit_prompts or None]
    # fail fast, before loading the model, on the settings known already (the rest is checked when writing)
    check_manifest(args.out, {"model": args.model, "prompts": prompts, "steps": args.steps,
                              "guidance": args.guidance, "seed": args.seed})
    comps = load_components(args.model, dtype=dtype, device=device)
    adapters = load_adapters(comps, args.lora, args.released, args.prefix, ema=not args.no_ema)
    manifest = generate_to_dir(
        comps, prompts, args.out, args.images_per_prompt, steps=args.steps, guidance=args.guidance, seed=args.seed,
        batch_size=args.batch_size, fmt=args.format, image_size=args.image_size,
        info={"model": args.model, "adapters": adapters, "prompt_spec": args.prompts},
    )
    print(f"[generate] {manifest['generated_this_run']} new image(s) in {args.out} "
          f"({len(prompts)} prompts x {manifest['images_per_prompt']}; complete: {manifest['complete']})")
    return manifest


if __name__ == "__main__":
    from common.runtime import cli

    cli(main)
