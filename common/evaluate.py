"""Evaluate generated images: detect faces, classify them, measure bias and semantics preservation, write a report.

    python -m common.evaluate --images outputs/exp-3/debiased --reference outputs/exp-3/original \
        --classifiers eval --out outputs/exp-3/eval

Input folders hold `prompt_{i}/img_{j}.{png,jpg}` (from `common.generate` or the authors' gen-images); the prompt
texts come from the folder's manifest.json or `--prompts`. The judges (`common.judges.Judges`: detector, classifier,
CLIP) measure each folder batch by batch, prompt by prompt, as the trainer's validation measures its samples. With
`--reference` (the original model's images from the same noise) the reference is judged too, and CLIP-I / DINO compare
each image with its partner of the same prompt index and image index. Outputs in OUT:
- `results.csv`: one row per image (set, prompt index, prompt, image index, file, face found, score, box, per
  attribute the class probabilities, the predicted class ("" without a face) and its confidence, per-image scores);
- `test_results.pkl` (and `reference_test_results.pkl`): the authors' structure (docs/method.md#metrics), a list
  `[face_indicators, face_bboxs, gender_logits, race_logits, age_logits]`, each a dict prompt index -> CPU tensor in
  image order (bool [n]; int64 [n, 4] expanded boxes, -1 rows without a face; fp32 logits [n, 2] / [n, 4] / [n, 2];
  logits of rows without a face are those of the all -1 crop, meaningless as in theirs). An attribute the classifier
  does not have is an EMPTY dict in its slot; attributes other than these three appear only in results.csv;
- `summary.json`, `summary.md`, `summary.csv` (mean +/- std over prompts and bootstrap 95% intervals, both sets side
  by side), `per_prompt.csv`;
- `grids/{set}/prompt_{i}.jpg`: annotated grids (`common.plots`); `frequency_{attribute}.png`: per-prompt class
  frequencies before (reference) and after, against the target.
With `--judge2 NAME` a second classifier reads the same face crops (one detection pass): results.csv gains its
`judge2_{attribute}_*` columns, summary.json its summaries ("judge2") and per set and attribute both judges' figures,
their agreement share and Cohen's kappa ("agreement", `common.metrics.agreement`), summary.md that table.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import pickle
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from common.attributes import Attribute
from common.judges import hub_options

IMAGE_EXTS = (".png", ".jpg", ".jpeg")
SCORES = ("clip_t", "clip_i", "dino")


# ----------------------------------------------------------------------------------------------------------------
# Image folders
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class ImageSet:
    """A folder of generated images: `files` = sorted (prompt index, image index, path); `prompts` = prompt index ->
    text ("" when unknown)."""

    root: Path
    files: list[tuple[int, int, Path]]
    prompts: dict[int, str]

    def prompt_indices(self) -> list[int]:
        return sorted({i for i, _, _ in self.files})


def scan_images(root: str | Path, prompts: Sequence[str] | None = None) -> ImageSet:
    """Find `prompt_{i}/img_{j}.{png,jpg,jpeg}` under `root` (sorted by i, then j). Prompt texts: `prompts` (indexed by
    i) if given, else the folder's manifest.json, else ""."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: image folder not found (expected prompt_{{i}}/img_{{j}}.png inside)")
    files = []
    for d in root.iterdir():
        m = re.fullmatch(r"prompt_(\d+)", d.name)
        if not (m and d.is_dir()):
            continue
        for f in d.iterdir():
            mf = re.fullmatch(r"img_(\d+)", f.stem)
            if mf and f.suffix.lower() in IMAGE_EXTS:
                files.append((int(m.group(1)), int(mf.group(1)), f))
    if not files:
        raise FileNotFoundError(f"{root}: no images found (expected prompt_{{i}}/img_{{j}}.png or .jpg)")
    files.sort(key=lambda t: (t[0], t[1]))
    dup = [(i, j) for (i, j, _), (i2, j2, _) in zip(files, files[1:]) if (i, j) == (i2, j2)]
    if dup:
        raise ValueError(f"{root}: prompt_{dup[0][0]}/img_{dup[0][1]} exists in two formats; keep one")
    texts: dict[int, str] = {}
    manifest = root / "manifest.json"
    if prompts is None and manifest.is_file():
        prompts = json.loads(manifest.read_text()).get("prompts")
    used = sorted({i for i, _, _ in files})
    if prompts is not None:
        if used[-1] >= len(prompts):
            raise ValueError(f"{root}: folder prompt_{used[-1]} has no prompt text ({len(prompts)} prompts given)")
        texts = {i: prompts[i] for i in used}
    else:
        texts = {i: "" for i in used}
    return ImageSet(root, files, texts)


def read_images(paths: Sequence[Path]) -> torch.Tensor:
    """Image files -> `[N, 3, H, W]` fp32 in [-1, 1] (all of one size)."""
    arrays = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    sizes = {a.shape for a in arrays}
    if len(sizes) > 1:
        raise ValueError(f"images of different sizes in one batch: {sorted(sizes)} ({paths[0].parent})")
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1


# ----------------------------------------------------------------------------------------------------------------
# Judging
# ----------------------------------------------------------------------------------------------------------------


class FolderModel:
    """An `ImageSet` as a `common.judges.ImageModel`: `(prompt index, prompt, image indices) -> images` read from its
    files; `plan` = {prompt index: image indices} and `files` in measured order, for `Judges.measure`."""

    def __init__(self, images: ImageSet):
        self.images = images
        self._path = {(i, j): p for i, j, p in images.files}
        self.plan: dict[int, list[int]] = {}
        for i, j, _ in images.files:
            self.plan.setdefault(i, []).append(j)

    def __call__(self, i: int, prompt: str, indices) -> torch.Tensor:
        return read_images([self._path[(i, j)] for j in indices])


@torch.no_grad()
def measure_folder(
    images: ImageSet,
    judges,
    batch_size: int = 16,
    grid_dir: str | Path | None = None,
    grid_tile: int = 256,
    grid_order: str = "class",
    progress: bool = True,
):
    """`judges.measure` (`common.judges.Judges`) over every image of `images`, prompt by prompt in batches of
    `batch_size` -> `common.judges.Measurement` (rows in `images.files` order; CLIP-T in `extra` when the judges hold
    CLIP). With `grid_dir`, writes `prompt_{i}.jpg` annotated grids of the judges' attributes, `grid_tile` px tiles."""
    from common.plots import annotated_grid

    source = FolderModel(images)
    if grid_dir is not None:
        Path(grid_dir).mkdir(parents=True, exist_ok=True)
    tiles: list = []

    def grid(i, indices, x, j, last):
        scale = grid_tile / x.shape[-1]
        boxes = j.faces.boxes.cpu().long()
        small = torch.nn.functional.interpolate(x.float(), size=(grid_tile, grid_tile), mode="bilinear",
                                                antialias=True, align_corners=False).cpu()
        tiles.append((small, torch.where(boxes >= 0, boxes.float() * scale, boxes.float()), j.found.cpu(),
                      {a: j.logits[a].softmax(-1).cpu() for a in j.logits}))
        if last:
            cat = [torch.cat([t[k] for t in tiles]) for k in range(3)]
            probs = {a: torch.cat([t[3][a] for t in tiles]) for a in tiles[0][3]}
            out = annotated_grid(cat[0], cat[1], probs, cat[2], judges.attributes, indices=source.plan[i],
                                 order=grid_order)
            out.save(Path(grid_dir) / f"prompt_{i}.jpg", quality=90)
            tiles.clear()

    return judges.measure(source, images.prompts, source.plan, batch_size=batch_size,
                          on_batch=grid if grid_dir is not None else None, progress=progress,
                          desc=f"judging {images.root.name}", files=images.files)


@torch.no_grad()
def paired_scores(
    images: ImageSet, reference: ImageSet, encoders: Mapping[str, object], batch_size: int = 16, device: str = "cpu",
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """CLIP-I / DINO: for every image of `images` the cosine similarity to the reference image with the same prompt
    index and image index (`common.metrics.paired_similarity`); float64 [N] in `images.files` order, NaN where the
    reference has no partner. `encoders`: name -> `common.features.load_image_encoder` callable."""
    from common.metrics import paired_similarity

    partner = {(i, j): p for i, j, p in reference.files}
    pairs = [(r, p, partner[(i, j)]) for r, (i, j, p) in enumerate(images.files) if (i, j) in partner]
    if not pairs:
        raise ValueError(f"{images.root} and {reference.root} share no (prompt index, image index) pair; --reference "
                         "must hold the original model's images generated from the same prompts and seeds")
    out = {name: torch.full((len(images.files),), float("nan"), dtype=torch.float64) for name in encoders}
    bar = tqdm(total=len(pairs), desc="paired similarity", unit="pair", disable=not progress)
    for s in range(0, len(pairs), batch_size):
        chunk = pairs[s : s + batch_size]
        a = read_images([p for _, p, _ in chunk]).to(device)
        b = read_images([q for _, _, q in chunk]).to(device)
        rows = torch.tensor([r for r, _, _ in chunk])
        for name, enc in encoders.items():
            out[name][rows] = paired_similarity(a, b, enc, batch_size=batch_size).double()
        bar.update(len(chunk))
    bar.close()
    return out


# ----------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------


def _fmt(summary: dict, m: str) -> str:
    if summary is None or m not in summary["mean"]:
        return ""
    mean, std = summary["mean"][m], summary["std"][m]
    if math.isnan(mean):
        return "n/a"
    s = f"{mean:.3f}" + ("" if math.isnan(std) else f" ± {std:.3f}")
    if m in summary["ci"] and not math.isnan(summary["ci"][m][0]):
        lo, hi = summary["ci"][m]
        s += f" [{lo:.3f}, {hi:.3f}]"
    return s


def summary_markdown(summaries: Mapping[str, dict | None], title: str = "Evaluation") -> str:
    """Markdown table: one row per metric, one column per image set (mean ± std over prompts [95% CI])."""
    sets = [k for k, v in summaries.items() if v is not None]
    metrics: list[str] = []
    for k in sets:
        metrics += [m for m in summaries[k]["metrics"] if m not in metrics]
    first = summaries[sets[0]]
    b = first["bootstrap"]
    lines = [
        f"# {title}",
        "",
        f"Mean ± std over prompts; [{int(b['level'] * 100)}% bootstrap interval: {b['n_boot']} resamples, "
        f"resampling {'prompts and images within prompts' if b['resample'] == 'both' else b['resample']} for "
        "frequency metrics, prompts for scores]. Frequencies among images with a detected face.",
        "",
        "| metric | " + " | ".join(sets) + " |",
        "|---|" + "---|" * len(sets),
    ]
    for m in metrics:
        lines.append(f"| {m} | " + " | ".join(_fmt(summaries[k], m) for k in sets) + " |")
    lines.append("")
    lines.append("| set | prompts | images | prompts without any face |")
    lines.append("|---|---|---|---|")
    for k in sets:
        s = summaries[k]
        lines.append(f"| {k} | {s['n_prompts']} | {s['n_images']} | {s['n_prompts_without_faces']} |")
    return "\n".join(lines) + "\n"


def judge_agreement(j, summary1: dict, summary2: dict, attrs1: Sequence[Attribute],
                    attrs2: Sequence[Attribute]) -> dict[str, dict]:
    """Per attribute of either judge (judge 1's first): its figure (`{a}_bias` or `{a}_gap`, mean / std over prompts
    and interval) under each judge that reads it (None under the other), and, for attributes both read, the share of
    images on which they agree and Cohen's kappa (`common.metrics.agreement`, pooled over all images of the set; only
    images with a face count) and how many images were compared."""
    from common.metrics import agreement, predictions, target_kind

    specs1, specs2 = {a.name: a for a in attrs1}, {a.name: a for a in attrs2}
    out = {}
    for name in [*specs1, *(n for n in specs2 if n not in specs1)]:
        spec = specs1.get(name, specs2.get(name))
        metric = f"{name}_{target_kind(spec)}"
        entry: dict = {"metric": metric}
        for key, specs, s in (("judge1", specs1, summary1), ("judge2", specs2, summary2)):
            inside = name in specs
            entry[key] = s["mean"][metric] if inside else None
            entry[f"{key}_std"] = s["std"][metric] if inside else None
            entry[f"{key}_ci"] = list(s["ci"][metric]) if inside and metric in s["ci"] else None
        entry.update(share=None, kappa=None, n_compared=0)
        if name in specs1 and name in specs2:
            pa, pb = predictions(j.probs[name], j.found), predictions(j.probs2[name], j.found)
            entry["share"], entry["kappa"] = agreement(pa, pb, spec.num_classes)
            entry["n_compared"] = int(((pa >= 0) & (pb >= 0)).sum())
        out[name] = entry
    return out


def _fmt_entry(e: dict, key: str) -> str:
    mean = e[key]
    if mean is None:
        return "-"
    if math.isnan(mean):
        return "n/a"
    s = f"{mean:.3f}" + ("" if e[f"{key}_std"] is None or math.isnan(e[f"{key}_std"]) else f" ± {e[f'{key}_std']:.3f}")
    ci = e.get(f"{key}_ci")
    if ci and ci[0] is not None and not math.isnan(ci[0]):
        s += f" [{ci[0]:.3f}, {ci[1]:.3f}]"
    return s


def agreement_markdown(agreement: Mapping[str, Mapping[str, dict]], judge1: str, judge2: str) -> str:
    """Markdown section of `evaluate`'s "agreement" report ({set: `judge_agreement`}): one row per attribute and set."""

    def num(v):
        return "-" if v is None else "n/a" if math.isnan(v) else f"{v:.3f}"

    lines = [
        f"## Judge agreement: judge 1 `{judge1}`, judge 2 `{judge2}`",
        "",
        "Each judge's figure: mean ± std over prompts [bootstrap interval], among images with a detected face (both "
        "judges read the same face crops). Agreement: share of those images to which both judges give the same "
        "class, pooled over prompts; Cohen's kappa corrects it for the agreement expected by chance from the two "
        "judges' class frequencies (n/a: no image compared, or both judges give every image one and the same class). "
        "'-': the judge does not read the attribute.",
        "",
        f"| attribute | set | metric | judge 1 ({judge1}) | judge 2 ({judge2}) | agreement | kappa | images compared |",
        "|---|---|---|---|---|---|---|---|",
    ]
    names = [a for per_set in agreement.values() for a in per_set]
    for a in dict.fromkeys(names):
        for label, per_set in agreement.items():
            if a not in per_set:
                continue
            e = per_set[a]
            both = e["judge1"] is not None and e["judge2"] is not None
            lines.append(f"| {a} | {label} | {e['metric']} | {_fmt_entry(e, 'judge1')} | {_fmt_entry(e, 'judge2')} | "
                         f"{num(e['share'])} | {num(e['kappa'])} | {e['n_compared'] if both else '-'} |")
    return "\n".join(lines) + "\n"


def _write_csv(path: Path, rows: list[dict]) -> None:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def short_labels(texts: Sequence[str], ids: Sequence[int], width: int = 40) -> list[str]:
    """Axis labels: the part of each prompt that differs (a shared template's prefix and suffix removed, e.g.
    "a photo of the face of a senator, a person" -> "senator"), cut to `width` characters; "prompt i" when empty."""
    import os

    texts = list(texts)
    if len(texts) > 1 and all(texts):
        pre = len(os.path.commonprefix(texts))
        suf = len(os.path.commonprefix([t[::-1] for t in texts]))
        if all(len(t) - pre - suf > 0 for t in texts):
            texts = [t[pre : len(t) - suf] for t in texts]
    return [(t if len(t) <= width else t[: width - 1] + "…") if t else f"prompt {i}" for t, i in zip(texts, ids)]


def _frequency_matrix(summary: dict, attr: Attribute, prompts: list[int]) -> np.ndarray:
    return np.array([[summary["per_prompt"][f"{attr.name}_freq_{c}"].get(i, np.nan) for c in attr.classes]
                     for i in prompts])


PAIRED_NAMES = {"clip": "clip_i", "tiny-clip": "clip_i", "dino": "dino", "tiny-dino": "dino"}
"""image encoder name -> the score it gives with --reference"""


def evaluate(
    images_dir: str | Path,
    out_dir: str | Path,
    classifier: str = "eval",
    classifier_path=None,
    detector: str = "mtcnn",
    reference_dir: str | Path | None = None,
    prompts: Sequence[str] | None = None,
    clip_model: str | None = None,
    image_encoders: Sequence[str] = ("clip", "dino"),
    targets: Mapping[str, Sequence[float]] | None = None,
    labels: tuple[str, str] = ("debiased", "original"),
    batch_size: int = 16,
    device: str | None = None,
    grids: bool = True,
    grid_tile: int = 256,
    grid_order: str = "class",
    n_boot: int = 1000,
    threshold: float = 0.8,
    progress: bool = True,
    classifier_kwargs: Mapping | None = None,
    judges=None,
    judge2: str | None = None,
    judge2_path=None,
) -> dict:
    """Judge `images_dir` (and `reference_dir`), compute the metrics and write the report into `out_dir` (see the
    module docstring). `judges`: a `common.judges.Judges` already loaded (then classifier / clip_model /
    image_encoders / judge2 are only recorded; `targets` still apply). `judge2`: a second classifier's registry name,
    run on the same face crops. Returns {"summaries": {label: summary}, "attributes": [...], "settings",
    "measurements": {label: `common.judges.Measurement`} (in memory, not in summary.json)}, and with a second judge
    "judge2" {"name", "attributes", "summaries"} and "agreement" {label: `judge_agreement`}."""
    from common.judges import Judges
    from common.plots import attribute_colors, frequency_plot

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sets = {labels[0]: scan_images(images_dir, prompts)}
    if reference_dir is not None:
        sets[labels[1]] = scan_images(reference_dir, prompts)
    if clip_model or (judges is not None and judges.clip is not None):
        for s in sets.values():
            if any(not t for t in s.prompts.values()):
                raise ValueError(f"{s.root}: CLIP-T needs the prompt texts; the folder has no manifest.json with "
                                 "them: pass --prompts FILE:SPLIT")
    if judges is None:
        judges = Judges.load(classifier, classifier_path, detector, clip_model,
                             image_encoders if reference_dir else (), device, classifier_kwargs, judge2=judge2,
                             judge2_path=judge2_path, targets=targets)
    else:
        judges = judges.with_targets(targets)
    if (judges.classifier2 is None) != (not judge2):  # judges loaded elsewhere must hold the judge the report names
        raise ValueError(f"judge2 = {judge2!r} but the judges hold {'no' if judges.classifier2 is None else 'a'} "
                         "second classifier; pass both (Judges.load(..., judge2=NAME)) or neither")
    attrs, attrs2 = judges.attributes, judges.attributes2

    judged = {label: measure_folder(s, judges, batch_size, grid_dir=out / "grids" / label if grids else None,
                           grid_tile=grid_tile, grid_order=grid_order, progress=progress) for label, s in sets.items()}
    if reference_dir is not None and judges.encoders:
        scores = paired_scores(sets[labels[0]], sets[labels[1]], judges.encoders, batch_size, device, progress)
        for name, v in scores.items():
            judged[labels[0]].extra[PAIRED_NAMES.get(name, name)] = v

    summaries = {label: j.summarize(threshold, n_boot) for label, j in judged.items()}
    agree = None
    if judges.classifier2 is not None:
        summaries2 = {label: j.summarize(threshold, n_boot, second=True) for label, j in judged.items()}
        agree = {label: judge_agreement(j, summaries[label], summaries2[label], attrs, attrs2)
                 for label, j in judged.items()}

    # files
    rows = [r for label, j in judged.items() for r in j.rows(label)]
    _write_csv(out / "results.csv", rows)
    for label, j in judged.items():
        name = "test_results.pkl" if label == labels[0] else "reference_test_results.pkl"
        with (out / name).open("wb") as f:
            pickle.dump(j.authors_results(), f)
    title = f"Evaluation of {Path(images_dir)}" + (f" against {Path(reference_dir)}" if reference_dir else "")
    md = summary_markdown(summaries, title)
    if agree is not None:
        md += "\n" + agreement_markdown(agree, classifier, judge2)
    (out / "summary.md").write_text(md)
    metric_rows = []
    for label, s in summaries.items():
        for m in s["metrics"]:
            lo, hi = s["ci"].get(m, (float("nan"), float("nan")))
            metric_rows.append({"set": label, "metric": m, "mean": s["mean"][m], "std": s["std"][m], "ci_low": lo,
                                "ci_high": hi, "n_prompts": s["n_prompts"]})
    _write_csv(out / "summary.csv", metric_rows)
    pp_rows = []
    for label, s in summaries.items():
        texts = sets[label].prompts
        for i in sorted(texts):
            pp_rows.append({"set": label, "prompt_index": i, "prompt": texts[i],
                            **{m: s["per_prompt"][m].get(i, float("nan")) for m in s["metrics"]}})
    _write_csv(out / "per_prompt.csv", pp_rows)
    prompt_ids = sets[labels[0]].prompt_indices()
    names = short_labels([sets[labels[0]].prompts[i] for i in prompt_ids], prompt_ids)
    import matplotlib.pyplot as plt

    for a in attrs:
        after = _frequency_matrix(summaries[labels[0]], a, prompt_ids)
        before = _frequency_matrix(summaries[labels[1]], a, prompt_ids) if reference_dir is not None else None
        fig = frequency_plot(after, a.target, a.classes, colors=attribute_colors(a), freq_before=before,
                             prompt_labels=names, title=f"{a.name}: per-prompt frequencies", labels=labels[::-1])
        fig.savefig(out / f"frequency_{a.name}.png", dpi=110)
        plt.close(fig)
    settings = {"images": str(images_dir), "reference": str(reference_dir) if reference_dir else None,
                "classifier": classifier, "classifier_path": str(classifier_path) if classifier_path else None,
                "detector": detector, "clip_model": clip_model, "image_encoders": list(image_encoders),
                "threshold": threshold, "labels": list(labels), "judge2": judge2,
                "judge2_path": str(judge2_path) if judge2_path else None}
    report = {"settings": settings, "attributes": [{"name": a.name, "classes": list(a.classes),
                                                     "target": list(a.target)} for a in attrs],
              "summaries": summaries}
    if agree is not None:
        report["judge2"] = {"name": judge2, "attributes": [{"name": a.name, "classes": list(a.classes),
                                                            "target": list(a.target)} for a in attrs2],
                            "summaries": summaries2}
        report["agreement"] = agree
    (out / "summary.json").write_text(json.dumps(_json_keys(report), indent=2) + "\n")
    return {**report, "measurements": judged}


def _json_keys(obj):
    """JSON with int dict keys (prompt indices) as strings and NaN as null."""
    if isinstance(obj, dict):
        return {str(k): _json_keys(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_keys(v) for v in obj]
    if isinstance(obj, float) and math.isnan(obj):
        return None
    return obj


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------


def _parse_targets(items: Sequence[str] | None) -> dict[str, list[float]]:
    out = {}
    for item in items or []:
        name, sep, vals = item.partition("=")
        try:
            if not sep:
                raise ValueError
            out[name] = [float(v) for v in vals.split(",")]
        except ValueError:
            raise ValueError(f"--target {item!r}: expected NAME=P1,P2,... e.g. age=0.75,0.25") from None
    return out


def cli_classifier_kwargs(input_size: int | None = None, label_map: str | None = None,
                          judges_config: str | None = None) -> dict | None:
    """`load_classifier` keywords from the command line: --classifier-input-size, the hub judges' `judges.label_map`
    and `judges.clip_prompts` of an experiment config (--judges-config, as the experiment scripts pass theirs) and
    --label-map FILE.yaml ({model label: "attribute:class"}, `common.hub_judges.read_label_map`; its entries win)."""
    out: dict = {"input_size": input_size} if input_size else {}
    if judges_config:
        from common.config import load_config

        out.update(hub_options(load_config(judges_config).judges))
    if label_map:
        from common.hub_judges import read_label_map

        out["label_map"] = {**out.get("label_map", {}), **read_label_map(label_map)}
    return out or None


def _parse_classifier_path(items: Sequence[str] | None):
    if not items:
        return None
    if all("=" in it for it in items):
        return {k: v for k, _, v in (it.partition("=") for it in items)}
    if len(items) == 1:
        return items[0]
    raise ValueError(f"--classifier-path {' '.join(items)}: give one path, or ATTRIBUTE=PATH pairs for 'eval'")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m common.evaluate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", required=True, help="folder of prompt_{i}/img_{j}.png (the evaluated model)")
    ap.add_argument("--reference", help="the original model's images from the same noise (CLIP-I / DINO pairs)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--classifiers", "--classifier", dest="classifier", default="eval",
                    help="classifier registry name (eval, fairface8, ...; `python -m common.classifiers list`)")
    ap.add_argument("--classifier-path", nargs="+", help="weights file, or ATTRIBUTE=PATH pairs for 'eval'")
    ap.add_argument("--classifier-input-size", type=int,
                    help="crop size the classifier sees (default its own: 224 for the authors' checkpoints)")
    ap.add_argument("--label-map", metavar="FILE.yaml", help="hf: classifiers: {model label: 'attribute:class'} for "
                    "labels the automatic mapping by name does not know, e.g. {Woman: 'gender:female'}")
    ap.add_argument("--judges-config", metavar="CONFIG.yaml", help="take the hub judges' judges.label_map and "
                    "judges.clip_prompts from this experiment config (the experiment scripts pass theirs)")
    ap.add_argument("--judge2", help="a second classifier (any registry name) run on the same face crops: the report "
                                     "gives each judge's bias per attribute, their agreement share and Cohen's kappa")
    ap.add_argument("--judge2-path", help="weights of the second judge (default: its own)")
    ap.add_argument("--detector", default="mtcnn", help="face detector: mtcnn | whole-image | a plug-in's")
    ap.add_argument("--prompts", help="FILE[:SPLIT] prompt texts when the folder has no manifest.json")
    ap.add_argument("--clip-model", help="CLIP (both towers) for CLIP-T, e.g. " + "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
                    + " or a local folder; omitted: CLIP-T is not computed")
    ap.add_argument("--image-encoders", nargs="*", default=["clip", "dino"],
                    help="encoders for CLIP-I / DINO with --reference (common.features names)")
    ap.add_argument("--target", action="append", metavar="NAME=P1,P2", help="override a target, e.g. age=0.75,0.25")
    ap.add_argument("--labels", nargs=2, default=["debiased", "original"], metavar=("IMAGES", "REFERENCE"))
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--device", help="default: cuda when available; cpu only with --cpu (or for synthetic judges)")
    ap.add_argument("--cpu", action="store_true", help="allow real judges to run on the CPU when no usable CUDA is found")
    ap.add_argument("--no-grids", action="store_true")
    ap.add_argument("--grid-tile", type=int, default=256, help="tile side in the grids (px)")
    ap.add_argument("--grid-order", choices=["class", "index"], default="class")
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--threshold", type=float, default=0.8, help="low-confidence threshold")
    return ap


def synthetic_judges() -> set[str]:
    """Judges built in the process (random ones for tests, the plug-ins' synthetic worlds'): CPU-sized, so they need
    no --cpu. They are the classifiers and image encoders registered `synthetic`."""
    from common.classifiers import CLASSIFIERS
    from common.features import IMAGE_ENCODERS

    return CLASSIFIERS.synthetic() | IMAGE_ENCODERS.synthetic()


def main(argv: Sequence[str] | None = None) -> dict:
    from common.runtime import enable_tf32, require_device

    args = build_parser().parse_args(argv)
    judges = {args.classifier, *(args.image_encoders if args.reference else ())} | ({args.judge2} if args.judge2 else set())
    names = "judges " + ", ".join(sorted(judges))
    args.device = require_device(names, args.cpu or judges <= synthetic_judges(), "pass --cpu (or --device cpu)",
                                 args.device)
    enable_tf32()
    prompts = None
    if args.prompts:
        from common.prompts import load_prompts

        prompts = load_prompts(args.prompts, cwd=True)
    report = evaluate(
        args.images, args.out, classifier=args.classifier, classifier_path=_parse_classifier_path(args.classifier_path),
        detector=args.detector, reference_dir=args.reference, prompts=prompts, clip_model=args.clip_model,
        image_encoders=args.image_encoders, targets=_parse_targets(args.target), labels=tuple(args.labels),
        batch_size=args.batch_size, device=args.device, grids=not args.no_grids, grid_tile=args.grid_tile,
        grid_order=args.grid_order, n_boot=args.n_boot, threshold=args.threshold,
        classifier_kwargs=cli_classifier_kwargs(args.classifier_input_size, args.label_map, args.judges_config),
        judge2=args.judge2, judge2_path=args.judge2_path,
    )
    print((Path(args.out) / "summary.md").read_text())
    return report


if __name__ == "__main__":
    from common.runtime import cli

    cli(main)
