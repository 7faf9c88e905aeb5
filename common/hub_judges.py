"""Hub judges: any transformers image classifier (`hf:`) or zero-shot CLIP (`clip:`) as the attribute classifier.

Names, usable wherever a classifier is named (`common.classifiers.load_classifier`, the configs' judges.classifier /
judges.eval_classifier, `common.evaluate --classifiers`, `common.reproduce --classifier`):
  hf:SOURCE     an `AutoModelForImageClassification` fed as its own image processor says (resize, rescale, mean /
                std), done in torch; its labels (config.id2label) are mapped BY NAME onto the project's attributes
                (`map_labels`): gender (female, male), race (WMELH, Black, Indian, Asian), age (young, old)
  clip:SOURCE   CLIPModel zero-shot: logits = CLIP's logits_per_image over one prompt per class (judges.clip_prompts).
                Adequate for gender, weak for race: on FairFace, CLIP ViT-L/14 reads gender about 96% right and race
                (7 classes) about 58% (CLIP paper; reproduced at 96.2% / 59.2% in LAION-AI/CLIP_benchmark issue 15)
  hf:A+hf:B     several models as one judge, each giving the attributes its labels map to (clip: parts mix in too)
SOURCE is a hub id or a local folder: absolute, ./relative to the working directory, or relative to the data folder.
Every judge has the `AttributeClassifier` interface (`attributes`, `input_size`, `name`, `forward(crops [N, 3, S, S]
in [-1, 1]) -> {attribute: logits [N, K] fp32}`, `predict`) and passes gradients to the crops (the trainer needs them).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from common.attributes import PRESETS
from common.classifiers import FAIRFACE_AGE_BINS, FAIRFACE_GENDER, RACE7_TO_4, age_label
from common.config import ConfigError, check_clip_prompts, data_path, data_root, parse_label_target

PREFIXES = ("hf:", "clip:")
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
"""a hub model id: `name` or `owner/name`"""
MAPPING_HELP = ("give {model label: 'attribute:class'} as the config's judges.label_map or in a YAML file passed with "
                "--label-map")

DEFAULT_CLIP_PROMPTS: dict[str, tuple[str, ...]] = {
    "gender": ("a photo of a woman", "a photo of a man"),
    "race": ("a photo of a white, middle eastern or latino person", "a photo of a black person",
             "a photo of an indian person", "a photo of an asian person"),
    "age": ("a photo of a young person", "a photo of an old person"),
}
"""clip: class prompts per attribute, in the classes' order (common.attributes)"""


@dataclass(frozen=True)
class HubPreset:
    """A hub judge for users with network access (tests never download): the name to use and what it was trained on."""

    name: str
    attributes: str
    trained_on: str


HUB_PRESETS = (
    HubPreset("hf:dima806/fairface_gender_image_detection", "gender",
              "ViT-B/16 (ImageNet-21k) finetuned on FairFace (nateraw/fairface), labels Female / Male; 93.4% on its "
              "validation split (model card)"),
    HubPreset("hf:nateraw/vit-age-classifier", "age",
              "ViT finetuned on FairFace (nateraw/fairface), its 9 age bins; the project's young / old cut applies"),
    HubPreset("hf:cledoux42/Ethnicity_Test_v003", "race",
              "ViT-B/16 at 384 px (AutoTrain), labels african / asian / caucasian / hispanic / indian, training data "
              "undocumented and no Middle Eastern class; no FairFace 7-race hub classifier was verified"),
    HubPreset("clip:openai/clip-vit-large-patch14", "gender (race weak)",
              "OpenAI CLIP ViT-L/14, zero-shot (400M web image-text pairs): FairFace gender ~96%, race ~58%"),
)


# ----------------------------------------------------------------------------------------------------------------
# Labels -> attributes
# ----------------------------------------------------------------------------------------------------------------


def norm_label(label) -> str:
    """A label's key: lower case, spaces / hyphens / underscores dropped ("Latino_Hispanic" -> "latinohispanic")."""
    return re.sub(r"[\s_\-]+", "", str(label)).lower()


def _auto_labels() -> dict[str, tuple[str, int]]:
    """Known label names -> (attribute, class index): the project's own class names, FairFace's gender, 7 races and
    9 age bins (old from `classifiers.DEFAULT_OLD_FROM`), and common synonyms."""
    out = {norm_label(c): (a, i) for a, spec in PRESETS.items() for i, c in enumerate(spec.classes)}
    synonyms = {"gender": {"woman": 0, "women": 0, "man": 1, "men": 1, **FAIRFACE_GENDER},
                "race": {"caucasian": 0, "latino": 0, "hispanic": 0, "african": 1, "africanamerican": 1, **RACE7_TO_4},
                "age": {b: age_label(b) for b in FAIRFACE_AGE_BINS}}
    for attr, words in synonyms.items():
        out.update({norm_label(w): (attr, c) for w, c in words.items()})
    return out


AUTO_LABELS = _auto_labels()


def map_labels(labels: Sequence[str], label_map: Mapping[str, str] | None = None, where: str = "model"
               ) -> tuple[dict[str, tuple[tuple[int, ...], ...]], set[str]]:
    """Which model outputs make up each class: {attribute: (output indices of class 0, of class 1, ...)}, attributes
    in the presets' order, and the `label_map` keys used. A label is looked up (by `norm_label`) in `label_map`
    ({model label: "attribute:class"}) first, then in `AUTO_LABELS`. ConfigError for a label neither knows, or for
    an attribute some of whose classes get no label."""
    user = {norm_label(k): (k, parse_label_target(v, f"label_map.{k}")) for k, v in (label_map or {}).items()}
    groups: dict[str, list[list[int]]] = {}
    unmapped, used = [], set()
    for i, label in enumerate(labels):
        key = norm_label(label)
        if key in user:
            used.add(user[key][0])
            attr, c = user[key][1]
        elif key in AUTO_LABELS:
            attr, c = AUTO_LABELS[key]
        else:
            unmapped.append(label)
            continue
        groups.setdefault(attr, [[] for _ in PRESETS[attr].classes])[c].append(i)
    classes = {a: list(s.classes) for a, s in PRESETS.items()}
    if unmapped:
        raise ConfigError(f"{where}: cannot map the model's label(s) {unmapped} (all labels: {list(labels)}) onto the "
                          f"project's attributes {classes}; {MAPPING_HELP}")
    for attr, g in groups.items():
        missing = [PRESETS[attr].classes[c] for c, idx in enumerate(g) if not idx]
        if missing:
            raise ConfigError(f"{where}: the labels {list(labels)} give no {attr} class {missing}, so {attr} "
                              f"probabilities cannot be formed; {MAPPING_HELP}")
    return {a: tuple(tuple(ix) for ix in groups[a]) for a in PRESETS if a in groups}, used


def read_label_map(path: str | Path) -> dict[str, str]:
    """A `--label-map` YAML file {model label: "attribute:class"}, validated."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--label-map {p}: file not found (expected YAML {{model label: 'attribute:class'}})")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"--label-map {p}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict) or not data or not all(isinstance(v, str) for v in data.values()):
        raise ConfigError(f"--label-map {p}: expected a mapping {{model label: 'attribute:class'}}, e.g. "
                          "{Woman: 'gender:female'}")
    out = {str(k): v for k, v in data.items()}
    for k, v in out.items():
        try:
            parse_label_target(v, f"{p}: {k}")
        except ValueError as e:
            raise ConfigError(str(e)) from None
    return out


# ----------------------------------------------------------------------------------------------------------------
# The image processor, in torch
# ----------------------------------------------------------------------------------------------------------------

_MODES = {0: "nearest", 1: "bicubic", 2: "bilinear", 3: "bicubic", 4: "bilinear", 5: "bilinear"}
"""PIL resample codes -> F.interpolate modes (lanczos approximated by bicubic, box / hamming by bilinear)"""


def _size_get(size, key: str):
    return size.get(key) if isinstance(size, Mapping) else getattr(size, key, None)


@dataclass(frozen=True)
class Preprocess:
    """A transformers image processor's steps on square face crops: pixel values u = (x + 1) * 127.5 resized to
    `resize` (h, w) with `mode` (antialiased), centre-cropped to each of `crops` in turn, then (u * rescale - mean) /
    std (and RGB -> BGR when `bgr`). Differentiable."""

    resize: tuple[int, int]
    mode: str
    crops: tuple[tuple[int, int], ...]
    rescale: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    bgr: bool = False

    @property
    def input_size(self) -> int:
        """The crop side for which the resize is the identity."""
        return max(self.resize)

    @classmethod
    def from_processor(cls, proc, where: str) -> Preprocess:
        """Read resize size / resample, centre crop (and ConvNeXt's crop_pct), rescale and mean / std of `proc`."""
        name = type(proc).__name__
        if not getattr(proc, "do_resize", False):
            raise ConfigError(f"{where}: its image processor ({name}) has do_resize off; a hub judge needs a fixed "
                              "input size")
        if getattr(proc, "do_pad", False):
            raise ConfigError(f"{where}: its image processor ({name}) pads images (do_pad), which hub judges do not "
                              "reproduce")
        size, crops = proc.size, []
        h, w, short = (_size_get(size, k) for k in ("height", "width", "shortest_edge"))
        if h and w:
            resize = (int(h), int(w))
        elif short and not _size_get(size, "longest_edge"):
            pct = getattr(proc, "crop_pct", None)
            if pct is not None and "ConvNext" not in name:
                raise ConfigError(f"{where}: its image processor ({name}) uses crop_pct = {pct}, which hub judges "
                                  "reproduce only for ConvNeXt")
            if pct is not None and short < 384:  # ConvNeXt: resize to short / crop_pct, centre crop to short
                resize = (int(short / pct),) * 2
                crops.append((int(short), int(short)))
            else:
                resize = (int(short),) * 2
        else:
            raise ConfigError(f"{where}: its image processor ({name}) size {size} is not supported (expected height "
                              "and width, or shortest_edge)")
        if getattr(proc, "do_center_crop", False):
            cs = proc.crop_size
            crops.append((int(_size_get(cs, "height")), int(_size_get(cs, "width"))))
        hw = resize
        for ch, cw in crops:
            if ch > hw[0] or cw > hw[1]:
                raise ConfigError(f"{where}: its image processor crops {ch} x {cw} out of {hw[0]} x {hw[1]}")
            hw = (ch, cw)
        resample = getattr(proc, "resample", None)
        if resample is None:  # transformers' default
            mode = "bilinear"
        else:
            mode = resample.value if isinstance(getattr(resample, "value", None), str) else _MODES.get(int(resample))
        if mode not in ("nearest", "bilinear", "bicubic"):
            raise ConfigError(f"{where}: its image processor's resample {resample!r} is not supported")
        three = lambda v: tuple(float(x) for x in (v if isinstance(v, Sequence) else [v] * 3))  # noqa: E731
        norm = getattr(proc, "do_normalize", False)
        return cls(
            resize=resize, mode=mode, crops=tuple(crops),
            rescale=float(proc.rescale_factor) if getattr(proc, "do_rescale", False) else 1.0,
            mean=three(proc.image_mean) if norm else (0.0,) * 3, std=three(proc.image_std) if norm else (1.0,) * 3,
            bgr=bool(getattr(proc, "do_flip_channel_order", False)),
        )

    def __call__(self, crops: torch.Tensor) -> torch.Tensor:
        """crops [N, 3, S, S] in [-1, 1] -> pixel_values [N, 3, h, w] (fp32, or fp64 for fp64 crops)."""
        u = (crops.to(torch.promote_types(crops.dtype, torch.float32)) + 1) * 127.5
        if tuple(u.shape[-2:]) != self.resize:
            smooth = self.mode != "nearest"
            u = F.interpolate(u, size=self.resize, mode=self.mode, align_corners=False if smooth else None,
                              antialias=smooth)
        for ch, cw in self.crops:
            top, left = int((u.shape[-2] - ch) / 2.0), int((u.shape[-1] - cw) / 2.0)
            u = u[..., top : top + ch, left : left + cw]
        mean = torch.tensor(self.mean, dtype=u.dtype, device=u.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=u.dtype, device=u.device).view(1, 3, 1, 1)
        x = (u * self.rescale - mean) / std
        return x.flip(1) if self.bgr else x


# ----------------------------------------------------------------------------------------------------------------
# The judges
# ----------------------------------------------------------------------------------------------------------------


class HubJudge(nn.Module):
    """What every hub judge shares: class names per attribute, the crop size, `predict`."""

    def __init__(self, classes: Mapping[str, Sequence[str]], input_size: int, name: str):
        super().__init__()
        self.classes = {a: tuple(c) for a, c in classes.items()}
        self.input_size = int(input_size)
        self.name = name

    @property
    def attributes(self) -> dict[str, tuple[str, ...]]:
        """Class names per attribute, in logit order."""
        return dict(self.classes)

    def _pixels(self, prep: Preprocess, crops: torch.Tensor) -> torch.Tensor:
        if crops.ndim != 4 or crops.shape[1] != 3:
            raise ValueError(f"{self.name} expects crops [N, 3, S, S] in [-1, 1], got shape {list(crops.shape)}")
        return prep(crops).to(next(self.parameters()).dtype)

    @torch.no_grad()
    def predict(self, crops: torch.Tensor) -> dict[str, torch.Tensor]:
        """{attribute: probabilities [N, K_a] fp32} (softmax of the logits), without gradient."""
        return {k: v.softmax(-1) for k, v in self(crops).items()}


class HFJudge(HubJudge):
    """A transformers image classifier whose outputs are summed into the project's classes: the logits of class c
    are log(sum of the softmax probabilities of the labels mapped to c), so softmax(logits) = those sums."""

    def __init__(self, model: nn.Module, groups: Mapping[str, tuple[tuple[int, ...], ...]], prep: Preprocess,
                 labels: Sequence[str], name: str):
        super().__init__({a: PRESETS[a].classes for a in groups}, prep.input_size, name)
        self.model, self.groups, self.prep, self.labels = model, dict(groups), prep, tuple(labels)

    def forward(self, crops: torch.Tensor) -> dict[str, torch.Tensor]:
        logp = self.model(pixel_values=self._pixels(self.prep, crops)).logits.float().log_softmax(-1)
        return {a: torch.stack([logp[:, list(ix)].logsumexp(-1) for ix in g], -1) for a, g in self.groups.items()}


class CLIPJudge(HubJudge):
    """Zero-shot CLIP: logits [N, K] = exp(logit_scale) * cos(image embedding, class prompt embeddings), i.e. CLIP's
    logits_per_image over the attribute's prompts. The prompt embeddings are computed once, at load."""

    def __init__(self, model: nn.Module, text_embeds: Mapping[str, torch.Tensor], prep: Preprocess, name: str):
        super().__init__({a: PRESETS[a].classes for a in text_embeds}, prep.input_size, name)
        self.model, self.prep = model, prep
        for a, t in text_embeds.items():
            self.register_buffer(f"text_{a}", t, persistent=False)

    def forward(self, crops: torch.Tensor) -> dict[str, torch.Tensor]:
        img = _pooled(self.model.get_image_features(pixel_values=self._pixels(self.prep, crops)))
        img = F.normalize(img.float(), dim=-1)
        scale = self.model.logit_scale.float().exp()
        return {a: scale * img @ getattr(self, f"text_{a}").float().T for a in self.classes}


class CombinedJudge(HubJudge):
    """Several hub judges as one (`hf:A+hf:B`): each gives its own attributes; crops come at the largest
    `input_size` and each part resizes them to its own."""

    def __init__(self, parts: Sequence[HubJudge], name: str):
        owner: dict[str, str] = {}
        for p in parts:
            for a in p.attributes:
                if a in owner:
                    raise ConfigError(f"{name}: attribute '{a}' is given by both {owner[a]} and {p.name}; combine "
                                      "models that read different attributes (or map one's labels elsewhere with "
                                      "judges.label_map / --label-map)")
                owner[a] = p.name
        super().__init__({a: c for p in parts for a, c in p.attributes.items()}, max(p.input_size for p in parts),
                         name)
        self.parts = nn.ModuleList(parts)

    def forward(self, crops: torch.Tensor) -> dict[str, torch.Tensor]:
        return {a: v for p in self.parts for a, v in p(crops).items()}

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(lab for p in self.parts for lab in getattr(p, "labels", ()))


def _pooled(out) -> torch.Tensor:
    """CLIP features from `get_*_features` (a tensor, or an output whose pooler_output holds the projection)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


# ----------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------


def is_hub_name(name: str) -> bool:
    """True for `hf:...` / `clip:...` classifier names (and their `+` combinations)."""
    return isinstance(name, str) and name.startswith(PREFIXES)


def split_name(name: str) -> list[tuple[str, str]]:
    """"hf:A+clip:B" -> [("hf", "A"), ("clip", "B")]; a part is split off only where `+` is followed by a prefix."""
    parts = []
    for part in re.split(r"\+(?=(?:hf|clip):)", name):
        kind, sep, source = part.partition(":")
        if not sep or kind not in ("hf", "clip") or not source.strip():
            raise ConfigError(f"classifier '{name}': part '{part}' should read hf:HUB_ID_OR_FOLDER or "
                              "clip:HUB_ID_OR_FOLDER")
        parts.append((kind, source.strip()))
    return parts


def resolve_source(kind: str, source: str, data_dir=None) -> tuple[str, bool]:
    """(folder or hub id, is_local). Absolute, ~ and ./ ../ paths are folders; other names are folders when the data
    folder holds them, else hub ids."""
    where = f"{kind}:{source}"
    if source.startswith(("/", "~", "./", "../")) or source in (".", ".."):
        p = Path(source).expanduser()
        if not p.is_dir():
            raise FileNotFoundError(f"{where}: folder {p} not found (expected a transformers model folder holding "
                                    "config.json)")
        return str(p), True
    p = data_path(source, data_dir)
    if p.is_dir():
        return str(p), True
    if not HUB_ID.fullmatch(source):
        raise FileNotFoundError(f"{where}: no folder {p} and not a hub id (owner/name); write a folder relative to "
                                f"the working directory as ./{source}")
    return source, False


def _from_pretrained(fn, src: str, local: bool, where: str, what: str, data_dir=None, **kw):
    """`fn(src, **kw)` with one sentence for a missing file or an unreachable hub id."""
    try:
        return fn(src, **kw)
    except OSError as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if local:
            raise OSError(f"{where}: could not load the {what} from {src} ({reason})") from None
        raise OSError(f"{where}: no folder {data_path(src, data_dir)} under the data folder {data_root(data_dir)}, and "
                      f"the {what} of the hub id could not be loaded ({reason}); download it once with network access "
                      f"(`huggingface-cli download {src}`) or pass a local folder (./PATH: relative to the working "
                      "directory)") from None


def _strict(info: Mapping, where: str, src: str) -> None:
    bad = sorted(info.get("missing_keys") or []) + sorted(str(k) for k in info.get("mismatched_keys") or [])
    if bad:
        raise ConfigError(f"{where}: the weights in {src} do not fill the model (missing or mismatched: {bad[:5]}"
                          f"{' ...' if len(bad) > 5 else ''})")


def _config(src: str, local: bool, where: str, data_dir):
    from transformers import AutoConfig

    if local and not (Path(src) / "config.json").is_file():
        raise FileNotFoundError(f"{where}: {src} holds no config.json: not a transformers model folder")
    return _from_pretrained(AutoConfig.from_pretrained, src, local, where, "model config", data_dir)


def load_hf(source: str, label_map: Mapping[str, str] | None = None, data_dir=None) -> tuple[HFJudge, set[str]]:
    """An `hf:` judge (frozen weights as loaded, eval mode) and the `label_map` keys it used."""
    from transformers import AutoImageProcessor, AutoModelForImageClassification
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

    where = f"hf:{source}"
    src, local = resolve_source("hf", source, data_dir)
    config = _config(src, local, where, data_dir)
    archs = list(getattr(config, "architectures", None) or [])
    if config.model_type not in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES or (
            archs and not any("ImageClassification" in a for a in archs)):
        hint = f"; for zero-shot CLIP write clip:{source}" if config.model_type == "clip" else ""
        raise ConfigError(f"{where}: {src} holds a '{config.model_type}' model ({', '.join(archs) or 'no architecture'}"
                          f"), not an image classifier (AutoModelForImageClassification){hint}")
    if config.problem_type in ("multi_label_classification", "regression") or config.num_labels < 2:
        raise ConfigError(f"{where}: {src} is a {config.problem_type or 'one-output'} model; hub judges need one "
                          "softmax over two or more labels")
    labels = [str(config.id2label[i]) for i in range(config.num_labels)]
    groups, used = map_labels(labels, label_map, where)
    model, info = _from_pretrained(AutoModelForImageClassification.from_pretrained, src, local, where, "weights",
                                   data_dir, output_loading_info=True)
    _strict(info, where, src)
    proc = _from_pretrained(AutoImageProcessor.from_pretrained, src, local, where,
                            "image processor (preprocessor_config.json: resize size, rescale, mean / std)", data_dir)
    return HFJudge(model.eval(), groups, Preprocess.from_processor(proc, where), labels, where), used


@torch.no_grad()
def load_clip(source: str, prompts: Mapping[str, Sequence[str]] | None = None, data_dir=None) -> CLIPJudge:
    """A `clip:` judge over `prompts` ({attribute: one prompt per class}; default `DEFAULT_CLIP_PROMPTS`)."""
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    where = f"clip:{source}"
    prompts = {a: list(p) for a, p in (prompts or DEFAULT_CLIP_PROMPTS).items()}
    for a, p in prompts.items():
        try:
            check_clip_prompts(a, p, f"clip_prompts.{a}")
        except ValueError as e:
            raise ConfigError(f"{where}: {e}") from None
    src, local = resolve_source("clip", source, data_dir)
    config = _config(src, local, where, data_dir)
    if config.model_type != "clip":
        raise ConfigError(f"{where}: {src} holds a '{config.model_type}' model, not a CLIP model (CLIPModel)")
    model, info = _from_pretrained(CLIPModel.from_pretrained, src, local, where, "weights", data_dir,
                                   output_loading_info=True)
    _strict(info, where, src)
    model.eval()
    proc = _from_pretrained(AutoImageProcessor.from_pretrained, src, local, where,
                            "image processor (preprocessor_config.json)", data_dir)
    tok = _from_pretrained(AutoTokenizer.from_pretrained, src, local, where, "tokenizer", data_dir)
    text = {}
    for a, p in prompts.items():
        t = tok(p, padding=True, return_tensors="pt")
        text[a] = F.normalize(_pooled(model.get_text_features(**t)).float(), dim=-1)
    return CLIPJudge(model, text, Preprocess.from_processor(proc, where), where)


def load_hub_judge(name: str, label_map: Mapping[str, str] | None = None,
                   clip_prompts: Mapping[str, Sequence[str]] | None = None, input_size: int | None = None,
                   data_dir=None) -> HubJudge:
    """The judge of an `hf:` / `clip:` name (parts joined by `+` combine). `label_map` applies to the hf: parts (each
    of its keys must name some part's label), `clip_prompts` to the clip: parts; `input_size` overrides the crop size
    asked of the detector (each model still resizes to its own)."""
    parts = split_name(name)
    kinds = {k for k, _ in parts}
    if label_map and "hf" not in kinds:
        raise ConfigError(f"classifier '{name}': a label map (judges.label_map / --label-map) applies to hf: judges")
    if clip_prompts and "clip" not in kinds:
        raise ConfigError(f"classifier '{name}': judges.clip_prompts applies to clip: judges")
    judges, used = [], set()
    for kind, source in parts:
        if kind == "hf":
            judge, u = load_hf(source, label_map, data_dir)
            used |= u
        else:
            judge = load_clip(source, clip_prompts, data_dir)
        judges.append(judge)
    unused = [k for k in (label_map or {}) if k not in used]
    if unused:
        labels = [lab for j in judges for lab in getattr(j, "labels", ())]
        raise ConfigError(f"classifier '{name}': label map entries {unused} name no label of the model(s) (labels: "
                          f"{labels})")
    judge = judges[0] if len(judges) == 1 else CombinedJudge(judges, name)
    judge.name = name
    if input_size:
        judge.input_size = int(input_size)
    return judge


def preset_lines() -> list[str]:
    """`python -m common.classifiers list`'s hub section."""
    lines = ["hub judges (hf:HUB_ID_OR_FOLDER, clip:HUB_ID_OR_FOLDER, hf:A+hf:B; presets need network once, then the "
             "hub cache):"]
    lines += [f"  {p.name:44s} {p.attributes}: {p.trained_on}" for p in HUB_PRESETS]
    return lines
