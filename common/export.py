"""Export a training run's adapter (or the authors' released `.pth` files) in the diffusers interchange formats.

    python -m common.export --run RUN_DIR [--step N] [--no-ema] --out DIR
    python -m common.export --from-released PATH [PATH ...] [--model NAME] [--no-ema] --out DIR

--from-released needs only the `.pth` files (keys, shapes and the LoRA rank are read from them); `--model` adds a
check of every shape against that base model.

Writes `pytorch_lora_weights.safetensors` (LoRA; `StableDiffusionPipeline.load_lora_weights(DIR)`) and/or
`learned_embeds-{i}.safetensors` (prefix tokens; `pipe.load_textual_inversion([...])`), `adapter_info.json` and a
`README.md` model card (base model, attributes and targets, adapted modules, step, metrics when the run logged them).
An SDXL run writes what `StableDiffusionXLPipeline.load_lora_weights(DIR)` reads (text_encoder_2 included) and its
prefix tokens as `learned_embeds_sdxl.safetensors` (`clip_l` / `clip_g`, one `load_textual_inversion` per encoder).
"""

from __future__ import annotations

import argparse
import csv
import json
import re
from collections.abc import Sequence
from pathlib import Path

import torch

from common.adapters import (
    INFO_FILE,
    LORA_FILE,
    SDXL_TI_FILE,
    add_lora,
    add_prefix_tokens,
    check_released,
    load_trainable_state_dict,
    read_released,
    save_lora,
    write_released,
)
from common.models import DTYPES

PART_NAMES = {"text_encoder": "text encoder", "text_encoder_2": "second text encoder (text_encoder_2)", "unet": "U-Net"}
_CKPT = re.compile(r"checkpoint(_tmp)?-(\d+)")


def find_checkpoint(run_dir: str | Path, step: int | None = None) -> tuple[Path, int]:
    """`RUN_DIR/ckpts/checkpoint-{step}` (or `checkpoint_tmp-{step}`); without `step`, the latest of either kind
    (the permanent one on a tie). Returns (folder, step)."""
    ckpts = Path(run_dir) / "ckpts"
    found = []
    for d in ckpts.iterdir() if ckpts.is_dir() else []:
        m = _CKPT.fullmatch(d.name)
        if m and d.is_dir():
            found.append((int(m.group(2)), m.group(1) is None, d))
    if not found:
        raise FileNotFoundError(f"{ckpts}: no checkpoint-N or checkpoint_tmp-N folder (is {run_dir} a training run?)")
    if step is not None:
        hits = [f for f in found if f[0] == step]
        if not hits:
            raise FileNotFoundError(f"{ckpts}: no checkpoint for step {step}; available steps: "
                                    f"{sorted({f[0] for f in found})}")
        found = hits
    s, _, d = max(found, key=lambda f: (f[0], f[1]))
    return d, s


def read_metrics(run_dir: str | Path, step: int) -> dict[str, str]:
    """The last row of `RUN_DIR/metrics.csv` at or before `step` (all rows if it has no `step` column); {} if none."""
    f = Path(run_dir) / "metrics.csv"
    if not f.is_file():
        return {}
    with f.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    if rows and "step" in rows[0]:
        rows = [r for r in rows if r.get("step") not in (None, "") and float(r["step"]) <= step]
    if not rows:
        return {}
    return {k: v for k, v in rows[-1].items() if k and v not in (None, "")}


def model_card(out_dir: str | Path, metadata: dict) -> Path:
    """Write `out_dir/README.md` describing the exported adapter (from `metadata` and `adapter_info.json`)."""
    out = Path(out_dir)
    info = json.loads((out / INFO_FILE).read_text()) if (out / INFO_FILE).is_file() else {}
    base = metadata.get("base_model", "?")
    lines = [f"# Fairness-finetuned adapter for `{base}`", "",
             "Finetuned for fair generation of people (Shen et al., ICLR 2024, reproduced by fair-diffusion).", "",
             f"- Base model: `{base}`", f"- Source: {metadata.get('source', '?')}"]
    if metadata.get("step") is not None:
        lines.append(f"- Training steps: {metadata['step']}")
    lines.append(f"- Weights: {metadata.get('weights', '?')}")
    if "shapes_checked_against" in metadata:  # a conversion of released files: say what their shapes were checked on
        checked = metadata["shapes_checked_against"]
        lines.append(f"- Shapes checked against: `{checked}`" if checked else
                     "- Shapes checked against: no base model (converted from the files alone; checked for internal "
                     "consistency)")
    for part in ("text_encoder", "text_encoder_2", "unet"):
        if part in info:
            p = info[part]
            layers = p.get("layers") or []  # SDXL's text_encoder: all but the last layer, whose output SDXL ignores
            span = f"layer {layers[0]}" if len(layers) == 1 else f"layers {layers[0]}-{layers[-1]}" if layers else ""
            where = f" in {span} (SDXL does not use the last layer)" if span else ""
            lines.append(f"- LoRA on the {PART_NAMES[part]}: rank {p['rank']}, alpha {p['alpha']}, targets "
                         f"{', '.join(p['targets'])}{where} ({p['tensors']} tensors)")
    if "prefix" in info:
        lines.append(f"- Prefix soft tokens: {', '.join(info['prefix']['tokens'])} (put in front of every prompt, "
                     "no separator)")
    attrs = metadata.get("attributes") or {}
    if attrs:
        lines += ["", "## Attributes and target distributions", "", "| attribute | classes | target |", "|---|---|---|"]
        for name, a in attrs.items():
            lines.append(f"| {name} | {', '.join(a['classes'])} | {', '.join(f'{t:.3g}' for t in a['target'])} |")
    metrics = metadata.get("metrics") or {}
    if metrics:
        lines += ["", "## Metrics (last logged row at or before this step)", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in metrics.items()]
    sdxl_prefix = "prefix" in info and info.get("model_type") == "SDXL"
    pipeline = "StableDiffusionXLPipeline" if info.get("model_type") == "SDXL" else "StableDiffusionPipeline"
    lines += ["", "## Use", "", "```python", f"from diffusers import {pipeline}"]
    lines += ["from safetensors.torch import load_file"] if sdxl_prefix else []
    lines += ["", f'pipe = {pipeline}.from_pretrained("{base}")']
    if (out / LORA_FILE).is_file():
        lines.append('pipe.load_lora_weights("path/to/this/folder")')
    if sdxl_prefix:  # one call per text encoder, the same tokens
        lines += [f'emb = load_file("path/to/this/folder/{SDXL_TI_FILE}")', f"tokens = {info['prefix']['tokens']}",
                  'pipe.load_textual_inversion(emb["clip_l"], token=tokens, text_encoder=pipe.text_encoder, '
                  "tokenizer=pipe.tokenizer)",
                  'pipe.load_textual_inversion(emb["clip_g"], token=tokens, text_encoder=pipe.text_encoder_2, '
                  "tokenizer=pipe.tokenizer_2)",
                  f'image = pipe("{info["prefix"]["prompt_prefix"]}A photo of the face of a doctor").images[0]']
    elif "prefix" in info:
        files = ", ".join(f'"path/to/this/folder/{f}"' for f in info["prefix"]["files"])
        lines += [f"pipe.load_textual_inversion([{files}])",
                  f'image = pipe("{info["prefix"]["prompt_prefix"]}A photo of the face of a doctor").images[0]']
    else:
        lines.append('image = pipe("A photo of the face of a doctor").images[0]')
    lines += ["```", "", "Or with this project: `python -m common.generate --lora path/to/this/folder ...`.", ""]
    f = out / "README.md"
    f.write_text("\n".join(lines))
    return f


def export_run(run_dir: str | Path, out_dir: str | Path, step: int | None = None, ema: bool = True) -> Path:
    """Rebuild the run's model from `RUN_DIR/config.yaml`, load a checkpoint's EMA (or current) weights, write the
    interchange files and the model card into `out_dir`. Returns `out_dir`."""
    from safetensors.torch import load_file

    from common.config import load_config
    from common.models import load_components

    run_dir, out = Path(run_dir), Path(out_dir)
    cfg_file = run_dir / "config.yaml"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file}: not found (expected the resolved config written by common.train)")
    cfg = load_config(cfg_file)
    ckpt, s = find_checkpoint(run_dir, step)
    weights = ckpt / ("ema.safetensors" if ema else "trainable.safetensors")
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: not found in checkpoint {ckpt}" + (" (use --no-ema for the current "
                                "weights)" if ema else ""))
    # the export runs on the CPU and only needs the shapes: half precision halves the memory ("auto" -> fp16)
    te_dtype = DTYPES[cfg.model.text_encoder_dtype] if cfg.model.text_encoder_dtype else None
    comps = load_components(cfg.model.name, dtype=DTYPES.get(cfg.model.dtype, torch.float16), text_encoder_dtype=te_dtype)
    ft = cfg.finetune
    if ft.prefix_tokens:
        add_prefix_tokens(comps, ft.prefix_tokens, cfg.train.seed)
    else:
        add_lora(comps, ft.text_encoder_lora, ft.unet_lora, ft.rank, text_encoders=ft.text_encoders)
    load_trainable_state_dict(comps, load_file(str(weights)), source=str(weights))
    metadata = {
        "base_model": cfg.model.name, "source": f"{run_dir} ({ckpt.name})", "step": s,
        "weights": "EMA" if ema else "current (no EMA)",
        "attributes": {a.name: {"classes": list(a.classes), "target": list(a.target)} for a in cfg.attribute_specs()},
        "metrics": read_metrics(run_dir, s),
    }
    save_lora(comps, out, metadata)
    model_card(out, metadata)
    return out


def export_released(paths: Sequence[str | Path], out_dir: str | Path, model: str | None = None,
                    ema: bool = True) -> tuple[Path, dict]:
    """Convert the authors' released `.pth` files into the interchange files in `out_dir` from the files alone; with
    `model`, first check every key and shape against that base model (it changes nothing in the output but the
    recorded metadata). The card's base model is `model`, else SD 1.5 (the base of every released checkpoint).
    Returns (`out_dir`, `Released.summary()`)."""
    from common.models import SD15, load_components

    rel = read_released(paths, ema)  # every file-level problem is reported before any base model is loaded
    if model is not None:
        check_released(rel, load_components(model, dtype=torch.float16))  # only shapes (and the prefix's table) matter
    info = rel.summary()
    files = ", ".join(f"`{f}`" for f in info["files"].values())
    metadata = {"base_model": model or SD15, "shapes_checked_against": model,
                "source": f"the authors' released checkpoint ({files})", "weights": "as released", "released": info}
    write_released(rel, out_dir, metadata)
    model_card(out_dir, metadata)
    return Path(out_dir), info


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m common.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", metavar="RUN_DIR", help="training run folder (config.yaml + ckpts/)")
    src.add_argument("--from-released", nargs="+", metavar="PATH",
                     help="the authors' released files, or folders holding them")
    p.add_argument("--step", type=int, help="checkpoint step (default: the latest checkpoint of either kind)")
    p.add_argument("--no-ema", action="store_true", help="export the current weights instead of the EMA")
    p.add_argument("--model", help="--from-released: a base model to check the files' shapes against (optional; the "
                   "conversion needs only the files)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    a = p.parse_args(argv)
    if a.run is not None:
        if a.model is not None:
            p.error("--model is for --from-released; --run reads the model from the run's config.yaml")
        out = export_run(a.run, a.out, step=a.step, ema=not a.no_ema)
    else:
        if a.step is not None:
            p.error("--step is for --run")
        out, info = export_released(a.from_released, a.out, model=a.model, ema=not a.no_ema)
        ranks = ", ".join(f"{PART_NAMES[p]} {r}" for p, r in info["ranks"].items())
        rank = f"LoRA rank {ranks} (inferred from the shapes)" if ranks else "no LoRA"
        prefix = f", {len(info['prefix_tokens'])} prefix tokens" if info["prefix_tokens"] else ""
        checked = f"shapes checked against {a.model}" if a.model else "no --model: shapes checked against each other"
        print(f"read {', '.join(info['files'].values())}: {rank}{prefix}; tensors {info['tensors']}; {checked}")
    written = sorted(f.name for f in Path(out).iterdir() if f.is_file())
    print(f"wrote {out}: {', '.join(written)}")
    return 0


if __name__ == "__main__":
    from common.runtime import cli

    cli(main)
