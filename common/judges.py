"""The judges: the one way the project looks at images. A `Judges` object holds the face detector, the attribute
classifier (and an optional second one reading the same crops), CLIP for CLIP-T, the image and face encoders and the
face bank, and offers two things:

- `judge(images) -> Judgement`: detect the largest face of each image, crop it and classify it (no gradient);
- `measure(model, prompts, n) -> Measurement`: `n` images per prompt from `model` (a sampler in memory, or a folder
  of images on disk), judged batch by batch, one row per image; `Measurement.summarize()` gives the per-prompt and
  mean metrics (`common.metrics.summarize`).

The trainer judges its rollouts with `judge` and validates with `measure`; `common.evaluate` (and through it
`common.reproduce` and the toy world's demo) measures folders of generated images with `measure`. One path, so a
figure in a training log and the same figure in an evaluation report are computed alike.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace

import torch
from tqdm.auto import tqdm

from common.attributes import PRESETS, Attribute, uniform

AUTHORS_SLOTS = ("gender", "race", "age")
"""attributes of the authors' test_results.pkl, in slot order after indicators and boxes"""
JUDGE2 = "judge2_"
"""prefix of the second judge's columns in results.csv"""


# ----------------------------------------------------------------------------------------------------------------
# One batch
# ----------------------------------------------------------------------------------------------------------------


def _dtype(module) -> torch.dtype:
    """The dtype a module computes in (its first parameter's; fp32 for a parameter-free module)."""
    p = next(iter(module.parameters()), None)
    return p.dtype if p is not None else torch.float32


def head_logits(classifier, crops: torch.Tensor, heads: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """fp32 logits per attribute of `crops` [N, 3, S, S] (keeps the graph: the training loss differentiates it).
    heads: attribute name -> classifier output name."""
    raw = classifier(crops.to(_dtype(classifier)))
    out = {}
    for attr, head in heads.items():
        if head not in raw:
            raise KeyError(f"classifier has no output '{head}' for attribute '{attr}'; it has {sorted(raw)}")
        out[attr] = raw[head].float()
    return out


def masked_probs(logits: torch.Tensor, found: torch.Tensor) -> torch.Tensor:
    """Softmax of `logits` [N, K], rows of -1 where `found` [N] is False (no face: no class)."""
    p = logits.softmax(-1)
    return torch.where(found[:, None].to(p.device), p, torch.full_like(p, -1.0))


def classify(classifier, crops: torch.Tensor, found: torch.Tensor, heads: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """Probabilities per attribute for `crops` (with gradient), rows of -1 where `found` is False."""
    return {a: masked_probs(v, found) for a, v in head_logits(classifier, crops, heads).items()}


@dataclass
class Judgement:
    """What the judges said about a batch of N images.

    faces: `common.faces.Faces`; logits[a]: [N, K_a] fp32 (rows without a face: those of the all -1 crop,
    meaningless); probs[a]: [N, K_a], rows of -1 where no face; pred[a]: [N] class or -1; conf[a]: [N] top probability
    (0 where no face); logits2 / probs2: the second judge's on the same face boxes (empty without one).
    """

    faces: object
    logits: dict[str, torch.Tensor]
    probs: dict[str, torch.Tensor]
    pred: dict[str, torch.Tensor]
    conf: dict[str, torch.Tensor]
    logits2: dict[str, torch.Tensor] = field(default_factory=dict)
    probs2: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def found(self) -> torch.Tensor:
        return self.faces.found


def judgement_of(faces, logits: Mapping[str, torch.Tensor], logits2: Mapping[str, torch.Tensor] | None = None
                 ) -> Judgement:
    """A `Judgement` from detected `faces` and the classifier logits of their crops."""
    from common.metrics import predictions

    found = faces.found
    probs = {a: masked_probs(v, found) for a, v in logits.items()}
    pred = {a: predictions(p, found.to(p.device)) for a, p in probs.items()}
    conf = {a: p.max(-1).values.clamp_min(0) for a, p in probs.items()}
    probs2 = {a: masked_probs(v, found) for a, v in (logits2 or {}).items()}
    return Judgement(faces, dict(logits), probs, pred, conf, dict(logits2 or {}), probs2)


# ----------------------------------------------------------------------------------------------------------------
# Many images
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Measurement:
    """One row per measured image, in the order measured (prompt by prompt, image indices ascending).

    prompt / index LongTensor[N]; found [N] bool; boxes [N, 4] int64 (-1 rows without a face); det_scores [N];
    logits / probs {attribute: [N, K]} fp32 (probs: softmax of every row; rows without a face are ignored by the
    metrics); classes {attribute: class names}; extra {name: [N]} per-image scores (NaN = none); logits2 / probs2 /
    classes2 the second judge's; texts {prompt index: text}; attributes / attributes2: what `summarize` measures;
    files: (prompt index, image index, path) per row when measured from a folder."""

    prompt: torch.Tensor
    index: torch.Tensor
    found: torch.Tensor
    boxes: torch.Tensor
    det_scores: torch.Tensor
    logits: dict[str, torch.Tensor]
    probs: dict[str, torch.Tensor]
    classes: dict[str, tuple[str, ...]]
    attributes: list[Attribute]
    texts: dict[int, str]
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    logits2: dict[str, torch.Tensor] = field(default_factory=dict)
    probs2: dict[str, torch.Tensor] = field(default_factory=dict)
    classes2: dict[str, tuple[str, ...]] = field(default_factory=dict)
    attributes2: list[Attribute] = field(default_factory=list)
    files: list | None = None

    @property
    def pred(self) -> dict[str, torch.Tensor]:
        """[N] class per attribute, -1 without a face (`common.metrics.predictions`)."""
        from common.metrics import predictions

        return {a: predictions(p, self.found) for a, p in self.probs.items()}

    def table(self) -> dict:
        """The input of `common.metrics.summarize`."""
        return {"prompt": self.prompt, "found": self.found, "probs": self.probs, "scores": self.extra}

    def summarize(self, threshold: float = 0.8, n_boot: int = 0, second: bool = False) -> dict:
        """Per-prompt metrics of `attributes` (of the second judge's `attributes2` with `second`), their mean / std
        over prompts and, with `n_boot` > 0, bootstrap intervals: `common.metrics.summarize`."""
        from common.metrics import summarize

        if second:
            table = {"prompt": self.prompt, "found": self.found, "probs": self.probs2}
            return summarize(table, self.attributes2, threshold=threshold, n_boot=n_boot)
        return summarize(self.table(), self.attributes, threshold=threshold, n_boot=n_boot)

    def gathered(self, gather: Callable[[torch.Tensor], torch.Tensor]) -> Measurement:
        """Every per-image tensor passed through `gather` (e.g. `Accelerator.gather`: all processes' rows)."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                out[f.name] = gather(v.contiguous())
            elif isinstance(v, dict) and v and all(isinstance(t, torch.Tensor) for t in v.values()):
                out[f.name] = {k: gather(t.contiguous()) for k, t in v.items()}
        return replace(self, **out, files=None)

    def authors_results(self) -> list[dict[int, torch.Tensor]]:
        """The authors' test_results.pkl: [face_indicators, face_bboxs, gender_logits, race_logits, age_logits], each
        {prompt index: tensor} in image order; an attribute the classifier lacks is an empty dict."""
        out: list[dict[int, torch.Tensor]] = [{}, {}, {}, {}, {}]
        for i in sorted(set(self.prompt.tolist())):
            rows = self.prompt == i
            out[0][i] = self.found[rows].clone()
            out[1][i] = self.boxes[rows].long().clone()
            for slot, attr in enumerate(AUTHORS_SLOTS, start=2):
                if attr in self.logits:
                    out[slot][i] = self.logits[attr][rows].float().clone()
        return out

    def rows(self, label: str) -> list[dict]:
        """Tidy per-image rows for results.csv."""
        import math

        out = []
        for r in range(len(self.prompt)):
            i, j = int(self.prompt[r]), int(self.index[r])
            found = bool(self.found[r])
            row = {"set": label, "prompt_index": i, "prompt": self.texts.get(i, ""), "image_index": j,
                   "file": str(self.files[r][2]) if self.files else "", "face_found": int(found),
                   "face_score": round(float(self.det_scores[r]), 5)}
            for k, name in enumerate(("box_x1", "box_y1", "box_x2", "box_y2")):
                row[name] = int(self.boxes[r, k])
            for pre, classes, probs in (("", self.classes, self.probs), (JUDGE2, self.classes2, self.probs2)):
                for a, names in classes.items():
                    p = probs[a][r]
                    for c, cname in enumerate(names):
                        row[f"{pre}{a}_p_{cname}"] = round(float(p[c]), 6)
                    row[f"{pre}{a}_pred"] = names[int(p.argmax())] if found else ""
                    row[f"{pre}{a}_conf"] = round(float(p.max()), 6) if found else ""
            for name, v in self.extra.items():
                row[name] = "" if math.isnan(float(v[r])) else round(float(v[r]), 6)
            out.append(row)
        return out


ImageModel = Callable[[int, str, Sequence[int]], torch.Tensor]
"""`model(prompt_index, prompt, image_indices) -> [len(image_indices), 3, H, W]` images in [-1, 1]: a sampler with
fixed noise per image index, or a reader of a folder's files."""


def attribute_specs(classes: Mapping[str, Sequence[str]], targets: Mapping[str, Sequence[float]] | None = None
                    ) -> list[Attribute]:
    """A classifier's attributes as `Attribute`s: presets (gender, race, age: their targets and colours) when the
    class count fits, else uniform targets; `targets` overrides a target distribution by attribute name."""
    targets = dict(targets or {})
    unknown = set(targets) - set(classes)
    if unknown:
        raise KeyError(f"--target names attribute(s) {sorted(unknown)} the classifier does not have ({list(classes)})")
    out = []
    for name, names in classes.items():
        base = PRESETS.get(name)
        if base is not None and base.num_classes == len(names):
            attr = Attribute(name, tuple(names), base.target, base.colors)
        else:
            attr = Attribute(name, tuple(names), uniform(len(names)))
        out.append(attr.with_target(targets.get(name)))
    return out


class Judges:
    """Detector, classifier(s) and encoders, loaded once; see the module docstring.

    classifier: an `AttributeClassifier`; detector: a `common.faces` registry name or instance; attributes: what
    `measure` summarizes (default: every classifier output, preset targets); heads: {attribute: classifier output}
    judged by `judge` (default: the attributes' own names; the trainer adds the kept attributes); classifier2 /
    attributes2: a second judge read on the same face boxes; clip: (CLIPModel, tokenizer) for CLIP-T; encoders: {name:
    image encoder} (semantics preservation, CLIP-I / DINO); face_encoder / face_bank: the realism loss's.
    """

    def __init__(self, classifier, detector="mtcnn", attributes: Sequence[Attribute] | None = None,
                 heads: Mapping[str, str] | None = None, classifier2=None, attributes2: Sequence[Attribute] | None = None,
                 clip=None, encoders: Mapping[str, object] | None = None, face_encoder=None, face_bank=None,
                 device: str | torch.device = "cpu"):
        self.classifier, self.detector, self.classifier2 = classifier, detector, classifier2
        self.attributes = list(attributes) if attributes is not None else attribute_specs(classifier.attributes)
        self.heads = dict(heads) if heads is not None else {a.name: a.name for a in self.attributes}
        self.attributes2 = (list(attributes2) if attributes2 is not None else
                            attribute_specs(classifier2.attributes) if classifier2 is not None else [])
        self.clip, self.encoders = clip, dict(encoders or {})
        self.face_encoder, self.face_bank = face_encoder, face_bank
        self.device = torch.device(device)

    # ------------------------------------------------------------------------------------------------ building
    @classmethod
    def from_config(cls, cfg, device, dtype=torch.float32) -> Judges:
        """The training judges of an experiment config: `judges.classifier` with the config's attributes (their
        heads) and `loss.keep` heads, `judges.detector`, `judges.features`, `judges.face_encoder` and `face_bank`."""
        from common.classifiers import load_classifier
        from common.config import data_path
        from common.faces import get_detector
        from common.features import FaceBank, load_face_encoder, load_image_encoder

        j, data = cfg.judges, cfg.paths.data_dir
        attrs = cfg.attribute_specs()
        heads = {a.name: cfg.attributes[a.name].head or a.name for a in attrs}
        heads.update({h: h for h in cfg.loss.keep})  # judged image by image, not debiased
        classifier = load_classifier(j.classifier, j.classifier_path, device=device, dtype=dtype, data_dir=data,
                                     label_map=j.label_map, clip_prompts=j.clip_prompts)
        encoders = {n: load_image_encoder(n, device=device, dtype=dtype) for n in j.features}
        face_encoder = (load_face_encoder(j.face_encoder, device=device, dtype=dtype, data_dir=data)
                        if j.face_encoder else None)
        bank = FaceBank.load(data_path(j.face_bank, data)).to(device) if j.face_bank else None
        return cls(classifier, get_detector(j.detector), attrs, heads, encoders=encoders, face_encoder=face_encoder,
                   face_bank=bank, device=device)

    @classmethod
    def load(cls, classifier: str = "eval", classifier_path=None, detector="mtcnn", clip_model: str | None = None,
             image_encoders: Sequence[str] = (), device: str = "cpu", classifier_kwargs: Mapping | None = None,
             judge2: str | None = None, judge2_path=None, targets: Mapping[str, Sequence[float]] | None = None
             ) -> Judges:
        """Evaluation judges by registry names (early, so that a missing weight file fails before any long work):
        `classifier` (any `load_classifier` name; hub options in `classifier_kwargs` go to whichever judges are hub
        judges), the second judge `judge2`, CLIP `clip_model` for CLIP-T, `image_encoders` for CLIP-I / DINO, and
        the target distributions `targets` ({attribute: probabilities}) overriding the presets."""
        from common.classifiers import load_classifier

        kw1, kw2 = judge_kwargs(classifier, judge2, classifier_kwargs)
        clf = load_classifier(classifier, path=classifier_path, device=device, **kw1)
        clf2 = load_classifier(judge2, path=judge2_path, device=device, **kw2) if judge2 else None
        clip = None
        if clip_model:
            from common.metrics import load_clip_model
            from common.models import clip_tokenizer

            clip = (load_clip_model(clip_model, device=device), clip_tokenizer())
        encoders = {}
        if image_encoders:
            from common.features import load_image_encoder

            encoders = {name: load_image_encoder(name, device=device) for name in image_encoders}
        if clf2 is None:
            attrs, attrs2 = attribute_specs(clf.attributes, targets), None
        else:
            attrs, attrs2 = judge_attributes(clf.attributes, clf2.attributes, targets)
        return cls(clf, detector, attrs, classifier2=clf2, attributes2=attrs2, clip=clip, encoders=encoders,
                   device=device)

    def with_targets(self, targets: Mapping[str, Sequence[float]] | None) -> Judges:
        """The same models measuring against other target distributions ({attribute: probabilities})."""
        if not targets:
            return self
        new = copy.copy(self)
        if self.classifier2 is None:
            new.attributes = attribute_specs(self.classifier.attributes, targets)
        else:
            new.attributes, new.attributes2 = judge_attributes(self.classifier.attributes,
                                                               self.classifier2.attributes, targets)
        return new

    # ------------------------------------------------------------------------------------------------ judging
    @torch.no_grad()
    def judge(self, images: torch.Tensor) -> Judgement:
        """Detect the largest face of each image [N, 3, H, W] in [-1, 1], crop it at the classifier's input size and
        classify it with every judge (the second judge reads the same boxes, cropped at its own input size)."""
        from common.faces import crop_faces, detect

        faces = detect(images, detector=self.detector, crop_size=self.classifier.input_size)
        logits = head_logits(self.classifier, faces.crops, self.heads)
        logits2 = None
        if self.classifier2 is not None:
            c2 = self.classifier2
            crops2 = (faces.crops if c2.input_size == self.classifier.input_size
                      else crop_faces(images, faces.boxes, c2.input_size))
            logits2 = head_logits(c2, crops2, {a: a for a in c2.attributes})
        return judgement_of(faces, logits, logits2)

    @torch.no_grad()
    def measure(self, model: ImageModel, prompts: Sequence[str] | Mapping[int, str],
                n: int | Mapping[int, Sequence[int]], batch_size: int = 16,
                on_batch: Callable[[int, Sequence[int], torch.Tensor, Judgement, bool], None] | None = None,
                progress: bool = False, desc: str = "measuring", files: list | None = None) -> Measurement:
        """Judge `n` images of each prompt from `model` (`ImageModel`), `batch_size` at a time, prompt by prompt.

        prompts: texts by prompt index (a list: indices 0..); n: images per prompt (indices 0..n-1) or {prompt
        index: image indices}. With CLIP loaded, `extra["clip_t"]` holds each image's CLIP-T. `on_batch(i, indices,
        images, judgement, last)` sees every batch (`last`: the prompt's final one), e.g. to draw grids or save
        images. `files`: the folder's (prompt index, image index, path) per row, kept for the report.
        """
        from common.metrics import clip_score

        texts = dict(enumerate(prompts)) if not isinstance(prompts, Mapping) else dict(prompts)
        plan = {i: list(range(n)) if isinstance(n, int) else list(n[i]) for i in texts}
        cols: dict[str, list] = {k: [] for k in ("prompt", "index", "found", "boxes", "det", "clip_t")}
        logits: dict[str, list] = {a: [] for a in self.heads}
        logits2: dict[str, list] = {a: [] for a in (self.classifier2.attributes if self.classifier2 else ())}
        bar = tqdm(total=sum(map(len, plan.values())), desc=desc, unit="img", disable=not progress)
        for i, idx in plan.items():
            for s in range(0, len(idx), batch_size):
                chunk = idx[s : s + batch_size]
                x = model(i, texts[i], chunk).to(self.device)
                j = self.judge(x)
                for a, v in j.logits.items():
                    logits[a].append(v.cpu())
                for a, v in j.logits2.items():
                    logits2[a].append(v.cpu())
                cols["prompt"] += [i] * len(chunk)
                cols["index"] += list(chunk)
                cols["found"].append(j.found.cpu())
                cols["boxes"].append(j.faces.boxes.cpu().long())
                cols["det"].append(j.faces.scores.float().cpu())
                if self.clip is not None:
                    clip_model, tok = self.clip
                    cols["clip_t"].append(clip_score(x, [texts[i]] * len(chunk), clip_model, tok))
                if on_batch is not None:
                    on_batch(i, chunk, x, j, s + batch_size >= len(idx))
                bar.update(len(chunk))
        bar.close()
        lg = {a: torch.cat(v) for a, v in logits.items()}
        lg2 = {a: torch.cat(v) for a, v in logits2.items()}
        return Measurement(
            prompt=torch.tensor(cols["prompt"], dtype=torch.long),
            index=torch.tensor(cols["index"], dtype=torch.long),
            found=torch.cat(cols["found"]),
            boxes=torch.cat(cols["boxes"]),
            det_scores=torch.cat(cols["det"]),
            logits=lg,
            probs={a: v.softmax(-1) for a, v in lg.items()},
            classes={a: tuple(self.classifier.attributes[h]) for a, h in self.heads.items()},
            attributes=self.attributes,
            texts=texts,
            extra={"clip_t": torch.cat(cols["clip_t"]).double()} if self.clip is not None else {},
            logits2=lg2,
            probs2={a: v.softmax(-1) for a, v in lg2.items()},
            classes2=dict(self.classifier2.attributes) if self.classifier2 is not None else {},
            attributes2=self.attributes2,
            files=files,
        )


# ----------------------------------------------------------------------------------------------------------------
# Two judges
# ----------------------------------------------------------------------------------------------------------------

HUB_OPTIONS = ("label_map", "clip_prompts")
"""`load_classifier` keywords that only hub judges (`hf:`, `clip:`) take"""


def hub_options(judges_config) -> dict:
    """The hub judges' keywords set in a config's `judges` section (`label_map`, `clip_prompts`; empty ones left out)."""
    return {k: getattr(judges_config, k) for k in HUB_OPTIONS if getattr(judges_config, k)}


def judge_kwargs(judge1: str, judge2: str | None, kwargs: Mapping | None) -> tuple[dict, dict]:
    """`load_classifier` keywords for each judge: the hub options (label map, CLIP prompts) go to whichever judges are
    hub judges, the rest (e.g. input_size) to judge 1 only. Hub options with no hub judge to take them are refused."""
    from common.hub_judges import is_hub_name
    from common.runtime import UsageError

    kwargs = dict(kwargs or {})
    hub = {k: v for k in HUB_OPTIONS if (v := kwargs.pop(k, None))}  # empty ones: nothing to route
    if hub and not any(n and is_hub_name(n) for n in (judge1, judge2)):
        raise UsageError(f"{' and '.join(hub)} apply to hf: / clip: judges, and neither '{judge1}' nor "
                         f"'{judge2}' is one" if judge2 else f"{' and '.join(hub)} apply to hf: / clip: judges, "
                         f"not to '{judge1}'")
    return ({**kwargs, **(hub if is_hub_name(judge1) else {})},
            dict(hub) if judge2 and is_hub_name(judge2) else {})


def judge_attributes(classes1: Mapping[str, Sequence[str]], classes2: Mapping[str, Sequence[str]],
                     targets: Mapping[str, Sequence[float]] | None = None) -> tuple[list[Attribute], list[Attribute]]:
    """`attribute_specs` of two judges with one set of `targets` (each judge takes those of its attributes). An
    attribute both judges read must have the same classes in the same order, or their predictions cannot be compared."""
    targets = dict(targets or {})
    unknown = set(targets) - set(classes1) - set(classes2)
    if unknown:
        raise KeyError(f"--target names attribute(s) {sorted(unknown)} neither judge has ({list(classes1)}, "
                       f"{list(classes2)})")
    for a in set(classes1) & set(classes2):
        if tuple(classes1[a]) != tuple(classes2[a]):
            from common.runtime import UsageError

            raise UsageError(f"the two judges read attribute '{a}' with different classes ({list(classes1[a])} and "
                             f"{list(classes2[a])}); pick a second judge with the first one's classes for it")
    return tuple(attribute_specs(c, {k: v for k, v in targets.items() if k in c}) for c in (classes1, classes2))
