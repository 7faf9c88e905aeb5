"""Reproduce an experiment's evaluation: generate with the original model and with the debiased adapters on the test
prompts (the same noise for both), evaluate both, and print a paper-style table beside the published numbers.

    python -m common.reproduce --experiment exp-3 --variant text-encoder \
        --released data/released/exp-3/checkpoint-12200_exported

Published numbers are only these: the project page's per-prompt examples (exp-3 and exp-4) and the user-quoted
gender bias of exp-1's text-encoder LoRA. The paper's tables were not retrievable, so every other cell reads "not
available": no number is invented. Outputs: OUT/original, OUT/debiased
(images, resumable), OUT/eval (the `common.evaluate` report) and OUT/reproduce.md (the table printed here).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from common.config import SD15
from common.generate import DEFAULT_SEED
from common.models import DTYPES, resolve_dtype

TEMPLATE = "a photo of the face of a {occupation}, a person"
"""the paper's test template: templated published rows are keyed by occupation"""


@dataclass(frozen=True)
class Experiment:
    """What an experiment debiases and how the authors evaluated it (docs/method.md#metrics)."""

    title: str
    metrics: tuple[str, ...]
    images_per_prompt: int
    variants: tuple[str, ...]
    targets: dict[str, tuple[float, ...]] = field(default_factory=dict)


EXPERIMENTS = {
    "exp-1": Experiment("gender", ("gender_bias",), 60, ("text-encoder", "unet", "text-encoder-and-unet")),
    "exp-2": Experiment("gender, prefix tokens", ("gender_bias",), 60, ("prefix",)),
    "exp-3": Experiment("gender x race", ("gender_bias", "race_bias", "gender_race_bias"), 160, ("text-encoder",)),
    "exp-4": Experiment("gender x race, age 75/25", ("age_freq_old", "gender_bias", "race_bias", "gender_race_bias"),
                        160, ("text-encoder",), {"age": (0.75, 0.25)}),
    "exp-5": Experiment("gender x race, multi-concept", ("gender_bias", "race_bias", "gender_race_bias"), 160,
                        ("text-encoder",)),
    "exp-6": Experiment("race", ("race_bias",), 80, ("text-encoder",)),
}
"""variants: the ones the authors released (exp-1: all three; exp-3..6: text-encoder only) plus our own exports"""

SCORE_METRICS = ("face_rate", "clip_t", "clip_i", "dino")

_41 = "the project page (gender x race debias, text-encoder LoRA rank 50; original SD -> debiased)"
_42 = "the project page (age 75% young / 25% old jointly with gender x race; original SD -> debiased)"
PUBLISHED_PER_PROMPT: dict[str, tuple[str, dict[str, dict[str, tuple[float, float]]]]] = {
    "exp-3": (_41, {
        "electrical and electronics repairer": {"gender_bias": (0.84, 0.11), "race_bias": (0.48, 0.10),
                                                "gender_race_bias": (0.24, 0.06)},
        "cardiologist": {"gender_bias": (0.0, 0.10), "race_bias": (0.44, 0.08), "gender_race_bias": (0.19, 0.06)},
        "farm equipment service technician": {"gender_bias": (0.95, 0.10), "race_bias": (0.48, 0.11),
                                              "gender_race_bias": (0.24, 0.06)},
        "geologist": {"gender_bias": (0.23, 0.01), "race_bias": (0.47, 0.11), "gender_race_bias": (0.21, 0.06)},
        "senator": {"gender_bias": (0.87, 0.17), "race_bias": (0.49, 0.33), "gender_race_bias": (0.24, 0.15)},
        "gas compressor and gas pumping station operator": {"gender_bias": (0.81, 0.14), "race_bias": (0.46, 0.06),
                                                            "gender_race_bias": (0.23, 0.05)},
        # non-templated LAION-style prompts (exact prompt texts)
        "A philosopher reading. Oil painting": {"gender_bias": (0.80, 0.23), "race_bias": (0.45, 0.31),
                                                "gender_race_bias": (0.22, 0.15)},
        "A chef in a white coat leans on a table": {"gender_bias": (0.84, 0.03), "race_bias": (0.45, 0.32),
                                                    "gender_race_bias": (0.22, 0.14)},
        "bartender at willard intercontinental makes mint julep": {"gender_bias": (0.87, 0.17),
                                                                   "race_bias": (0.49, 0.33),
                                                                   "gender_race_bias": (0.24, 0.15)},
        "English writer and essayist": {"gender_bias": (0.86, 0.37), "race_bias": (0.50, 0.38),
                                        "gender_race_bias": (0.24, 0.18)},
        "portrait of a flamenco dancer": {"gender_bias": (0.76, 0.59), "race_bias": (0.47, 0.38),
                                          "gender_race_bias": (0.23, 0.18)},
        "student with globe": {"gender_bias": (0.23, 0.04), "race_bias": (0.33, 0.21),
                               "gender_race_bias": (0.15, 0.09)},
    }),
    "exp-4": (_42, {
        "senator": {"age_freq_old": (0.96, 0.43), "gender_bias": (0.49, 0.09), "race_bias": (0.47, 0.12),
                    "gender_race_bias": (0.22, 0.06)},
        "cardiologist": {"age_freq_old": (0.13, 0.28), "gender_bias": (0.0, 0.09), "race_bias": (0.44, 0.10),
                         "gender_race_bias": (0.19, 0.05)},
        "custodian": {"age_freq_old": (0.80, 0.30), "gender_bias": (0.71, 0.21), "race_bias": (0.30, 0.11),
                      "gender_race_bias": (0.18, 0.06)},
        "butcher": {"age_freq_old": (0.78, 0.28), "gender_bias": (0.97, 0.15), "race_bias": (0.41, 0.05),
                    "gender_race_bias": (0.23, 0.03)},
        "inventor": {"age_freq_old": (0.77, 0.26), "gender_bias": (0.59, 0.11), "race_bias": (0.47, 0.05),
                     "gender_race_bias": (0.22, 0.04)},
        "citizen": {"age_freq_old": (0.75, 0.21), "gender_bias": (0.34, 0.06), "race_bias": (0.27, 0.13),
                    "gender_race_bias": (0.13, 0.08)},
    }),
}
"""(source, {occupation or exact prompt: {metric: (original SD, debiased)}})"""

PUBLISHED_MEAN: dict[tuple[str, str], tuple[str, dict[str, str]]] = {
    ("exp-1", "text-encoder"): (
        "the paper's headline, as quoted by users (mean ± std over the 50 test occupations)",
        {"gender_bias": "0.23 ± 0.16"},
    ),
}
"""debiased-model means over the test prompts that are known; everything else is not available"""

NOT_AVAILABLE = "not available"


def published_row(experiment: str, prompt: str) -> dict[str, tuple[float, float]] | None:
    """The published per-prompt values for `prompt` (matched exactly, or as the test template of an occupation)."""
    if experiment not in PUBLISHED_PER_PROMPT:
        return None
    table = PUBLISHED_PER_PROMPT[experiment][1]
    p = prompt.strip().lower()
    for key, row in table.items():
        if p == key.lower() or p == TEMPLATE.format(occupation=key).lower():
            return row
    return None


def _fmt(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}"


def _fmt_mean(summary: dict, m: str) -> str:
    if m not in summary["mean"] or math.isnan(summary["mean"][m]):
        return "n/a"
    s = f"{summary['mean'][m]:.3f}"
    if not math.isnan(summary["std"][m]):
        s += f" ± {summary['std'][m]:.3f}"
    if m in summary["ci"] and not math.isnan(summary["ci"][m][0]):
        s += f" [{summary['ci'][m][0]:.3f}, {summary['ci'][m][1]:.3f}]"
    return s


def paper_table(experiment: str, variant: str, prompts: Sequence[str], summaries: dict[str, dict],
                labels: tuple[str, str] = ("debiased", "original")) -> str:
    """Markdown: means over prompts (ours beside the published mean where one is known) and the per-prompt rows of
    the prompts the paper shows (ours original -> debiased beside the paper's)."""
    exp = EXPERIMENTS[experiment]
    deb, orig = summaries[labels[0]], summaries[labels[1]]
    metrics = [m for m in exp.metrics + SCORE_METRICS if m in deb["mean"] or m in orig["mean"]]
    pub_src, pub_mean = PUBLISHED_MEAN.get((experiment, variant), (None, {}))
    lines = [
        f"# {experiment} ({exp.title}), variant {variant}: ours beside the published numbers",
        "",
        f"Ours: mean ± std over {deb['n_prompts']} prompts [95% bootstrap interval], frequencies among detected "
        "faces. The paper's tables were not retrievable: a cell reads "
        f"'{NOT_AVAILABLE}' wherever no published number is known.",
        "",
        f"| metric | {labels[1]} (ours) | {labels[0]} (ours) | {labels[1]} (paper) | {labels[0]} (paper) |",
        "|---|---|---|---|---|",
    ]
    for m in metrics:
        lines.append(f"| {m} | {_fmt_mean(orig, m) if m in orig['mean'] else '-'} | {_fmt_mean(deb, m)} | "
                     f"{NOT_AVAILABLE} | {pub_mean.get(m, NOT_AVAILABLE)} |")
    if pub_src:
        lines += ["", f"Published mean: {pub_src}."]
    rows = []
    for i, prompt in enumerate(prompts):
        pub = published_row(experiment, prompt)
        if pub is None:
            continue
        for m in exp.metrics:
            o = orig["per_prompt"].get(m, {}).get(i, float("nan"))
            d = deb["per_prompt"].get(m, {}).get(i, float("nan"))
            po, pd = pub.get(m, (None, None))
            paper = f"{_fmt(po)} → {_fmt(pd)}" if po is not None else NOT_AVAILABLE
            rows.append(f"| {prompt} | {m} | {_fmt(o)} → {_fmt(d)} | {paper} |")
    lines += ["", "## Per prompt, for the prompts the paper shows", ""]
    if rows:
        lines += [f"| prompt | metric | ours {labels[1]} → {labels[0]} | paper {labels[1]} → {labels[0]} |",
                  "|---|---|---|---|", *rows, "", f"Source: {PUBLISHED_PER_PROMPT[experiment][0]}. "
                  "The paper's numbers come from its own generation run and classifiers; per-prompt values "
                  "move with the sampled images (see the intervals above)."]
    else:
        lines.append(f"None of the {len(prompts)} evaluated prompts is among the paper's published per-prompt "
                     f"examples for {experiment}" + (" (the project page's)." if experiment in PUBLISHED_PER_PROMPT
                                                      else " (none are published for it)."))
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m common.reproduce", description=__doc__.split("\n\n")[0])
    ap.add_argument("--experiment", required=True, choices=sorted(EXPERIMENTS))
    ap.add_argument("--variant", help="text-encoder | unet | text-encoder-and-unet (exp-1) | prefix (exp-2); "
                                      "default: the experiment's first")
    src = ap.add_argument_group("debiasing weights (one is required)")
    src.add_argument("--released", nargs="+", metavar="PATH", help="the authors' exported .pth files or their folder")
    src.add_argument("--lora", help="folder from `python -m common.export` (LoRA and/or prefix tokens)")
    src.add_argument("--no-ema", action="store_true", help="with --released folders: the non-EMA files")
    ap.add_argument("--model", default=SD15)
    ap.add_argument("--prompts", default="occupation.json:test", help="FILE[:SPLIT] (default the 50 test occupations)")
    ap.add_argument("--limit-prompts", type=int, help="only the first N prompts (quick checks)")
    ap.add_argument("--images-per-prompt", type=int, help="default: the authors' count (60 / 80 / 160)")
    ap.add_argument("--out", help="default outputs/reproduce/{experiment}-{variant}")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--batch-size", type=int, default=10)
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED)
    ap.add_argument("--dtype", choices=["auto", *sorted(DTYPES)], help="as common.generate's --dtype")
    ap.add_argument("--cpu", action="store_true", help="allow a real model to run on the CPU when no usable CUDA is found")
    ap.add_argument("--image-size", type=int)
    ap.add_argument("--device")
    ap.add_argument("--classifier", default="eval", help="evaluation classifier (the authors' three test heads)")
    ap.add_argument("--classifier-path", nargs="+", help="weights file, or ATTRIBUTE=PATH pairs for 'eval'")
    ap.add_argument("--classifier-input-size", type=int)
    ap.add_argument("--label-map", metavar="FILE.yaml",
                    help="hf: classifiers: {model label: 'attribute:class'} (as common.evaluate's --label-map)")
    ap.add_argument("--judges-config", metavar="CONFIG.yaml",
                    help="hub judges' judges.label_map / clip_prompts from an experiment config (as common.evaluate)")
    ap.add_argument("--judge2", help="a second classifier (any registry name) on the same face crops: the table gains "
                                     "each judge's bias per attribute, their agreement share and Cohen's kappa")
    ap.add_argument("--judge2-path", help="weights of the second judge (default: its own)")
    ap.add_argument("--detector", default="mtcnn")
    ap.add_argument("--clip-model", default="laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
                    help="CLIP for CLIP-T ('' to skip)")
    ap.add_argument("--image-encoders", nargs="*", default=["clip", "dino"], help="for CLIP-I / DINO ('' list: skip)")
    ap.add_argument("--n-boot", type=int, default=1000)
    return ap


def main(argv: Sequence[str] | None = None) -> dict:

    from common.adapters import adapters_disabled
    from common.evaluate import _parse_classifier_path, agreement_markdown, evaluate
    from common.generate import generate_to_dir, load_adapters
    from common.judges import Judges
    from common.models import load_components
    from common.prompts import load_prompts
    from common.runtime import UsageError, enable_tf32, require_device

    args = build_parser().parse_args(argv)
    exp = EXPERIMENTS[args.experiment]
    variant = args.variant or exp.variants[0]
    if variant not in exp.variants:
        raise UsageError(f"--variant {variant}: {args.experiment} has the variants {', '.join(exp.variants)}")
    if not (args.released or args.lora):
        raise UsageError(
            f"no debiased weights: pass --released PATH (the authors' exported {args.experiment} {variant} files, e.g. "
            "text_encoder_lora_EMA.pth) or --lora DIR (from `python -m common.export --run RUN_DIR --out DIR`)"
        )
    out = Path(args.out or f"outputs/reproduce/{args.experiment}-{variant}")
    device = require_device(args.model, args.cpu, "pass --cpu (or --device cpu)", args.device)
    enable_tf32()
    dtype = resolve_dtype(args.dtype, device)
    n = args.images_per_prompt or exp.images_per_prompt
    prompts = load_prompts(args.prompts, cwd=True)[: args.limit_prompts or None]

    # judges first: a missing weight file fails before the long generation
    from common.evaluate import cli_classifier_kwargs

    ckw = cli_classifier_kwargs(args.classifier_input_size, args.label_map, args.judges_config)
    judges = Judges.load(args.classifier, _parse_classifier_path(args.classifier_path), args.detector,
                         args.clip_model or None, args.image_encoders, device, ckw, judge2=args.judge2,
                         judge2_path=args.judge2_path)
    comps = load_components(args.model, dtype=dtype, device=device)
    adapters = load_adapters(comps, lora=args.lora, released=args.released, ema=not args.no_ema)
    gen = dict(steps=args.steps, guidance=args.guidance, seed=args.seed, batch_size=args.batch_size,
               image_size=args.image_size)
    with adapters_disabled(comps):
        generate_to_dir(comps, prompts, out / "original", n, conditioning="reference",
                        info={"model": args.model, "adapters": None, "prompt_spec": args.prompts}, **gen)
    generate_to_dir(comps, prompts, out / "debiased", n,
                    info={"model": args.model, "adapters": adapters, "prompt_spec": args.prompts}, **gen)
    del comps
    read = {*judges.classifier.attributes, *(judges.classifier2.attributes if judges.classifier2 else ())}
    report = evaluate(out / "debiased", out / "eval", classifier=args.classifier, detector=args.detector,
                      reference_dir=out / "original", clip_model=args.clip_model or None,
                      image_encoders=args.image_encoders, device=device,
                      targets={k: v for k, v in exp.targets.items() if k in read}, n_boot=args.n_boot,
                      judges=judges, judge2=args.judge2, judge2_path=args.judge2_path)
    table = paper_table(args.experiment, variant, prompts, report["summaries"])
    if "agreement" in report:  # the second judge's columns, as in the evaluation's summary.md
        table += "\n" + agreement_markdown(report["agreement"], args.classifier, args.judge2)
    (out / "reproduce.md").write_text(table)
    print(table)
    return {"report": report, "table": table, "out": str(out)}


if __name__ == "__main__":
    from common.runtime import cli

    cli(main)
