"""Attribute classifiers on face crops: torchvision MobileNetV3-Large backbones with the authors' heads.

Input: 224 x 224 face crops in [-1, 1], with NO ImageNet normalisation (as the authors). Output: one logit vector
per attribute, class orders as `common.attributes` (gender: female, male; race: WMELH, Black, Indian, Asian; age:
young, old).

Layouts (the checkpoint files of the authors' data.zip, docs/method.md#classifiers):
  celeba80    80 logits = 40 CelebA attributes x 2; attribute 20 ("Male") -> gender      (training, exp-1/2)
  fairface6   6 logits  = [gender 2 | race 4]                                           (training, exp-3/5/6)
  fairface8   8 logits  = [gender 2 | race 4 | age 2]                                   (training, exp-4)
  eval-gender / eval-race / eval-age: 2 / 4 / 2 logits                                 (evaluation)
  eval        the three evaluation classifiers as one module returning all three attributes
Our own: `python -m common.classifiers train --dataset fairface|celeba --root DIR` (public label files), and
`python -m common.classifiers list`. Hub classifiers: `hf:HUB_ID_OR_FOLDER`, `clip:HUB_ID_OR_FOLDER` and their `+`
combinations (common/hub_judges.py).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from common.attributes import PRESETS
from common.config import ConfigError, data_path, data_root
from common.registry import registry
from common.runtime import device_chunks

GENDER = PRESETS["gender"].classes
RACE = PRESETS["race"].classes
AGE = PRESETS["age"].classes


# ----------------------------------------------------------------------------------------------------------------
# The module
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Head:
    """One attribute read from a backbone's logits: `logits` are indices into backbone `net`'s output vector, in
    the order of `classes`."""

    attribute: str
    classes: tuple[str, ...]
    logits: tuple[int, ...]
    net: int = 0

    def __post_init__(self):
        if len(self.classes) != len(self.logits):
            raise ValueError(f"head '{self.attribute}': {len(self.classes)} classes but logits {list(self.logits)}")


class AttributeClassifier(nn.Module):
    """Backbone(s) + heads. forward(crops [N, 3, S, S] in [-1, 1]) -> {attribute: logits [N, K_a] fp32}.

    Crops of another size than `input_size` are resized (bilinear, no antialias, like the authors' tensor Resize).
    Several backbones can be combined (the "eval" classifier runs three): each head names its backbone.
    """

    def __init__(self, nets: nn.Module | Sequence[nn.Module], heads: Sequence[Head], input_size: int = 224, name=""):
        super().__init__()
        self.nets = nn.ModuleList([nets] if isinstance(nets, nn.Module) else list(nets))
        self.heads = tuple(heads)
        self.input_size = int(input_size)
        self.name = name
        names = [h.attribute for h in self.heads]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate attribute heads {names}")

    @property
    def attributes(self) -> dict[str, tuple[str, ...]]:
        """Class names per attribute, in logit order."""
        return {h.attribute: h.classes for h in self.heads}

    def forward(self, crops: torch.Tensor) -> dict[str, torch.Tensor]:
        if crops.ndim != 4 or crops.shape[1] != 3:
            raise ValueError(f"classifier expects crops [N, 3, S, S] in [-1, 1], got shape {list(crops.shape)}")
        if crops.shape[-2:] != (self.input_size, self.input_size):
            crops = F.interpolate(
                crops, size=(self.input_size,) * 2, mode="bilinear", align_corners=False, antialias=False
            )
        dtype = next(self.parameters()).dtype
        x = crops.to(dtype)
        parts = device_chunks(len(x), x.device)  # on the CPU a few crops per call run faster per crop than many
        outs = [torch.cat([net(x[p]) for p in parts]).float() for net in self.nets]
        return {h.attribute: outs[h.net][:, list(h.logits)] for h in self.heads}

    @torch.no_grad()
    def predict(self, crops: torch.Tensor) -> dict[str, torch.Tensor]:
        """{attribute: probabilities [N, K_a] fp32} (softmax of the logits), without gradient."""
        return {k: v.softmax(-1) for k, v in self(crops).items()}


def mobilenet(num_logits: int) -> nn.Module:
    """torchvision mobilenet_v3_large (random weights) with classifier[3] = Linear(1280, num_logits)."""
    from torchvision.models import mobilenet_v3_large

    net = mobilenet_v3_large(weights=None)
    net.classifier[3] = nn.Linear(net.classifier[3].in_features, num_logits)
    return net


# ----------------------------------------------------------------------------------------------------------------
# Layouts of the authors' checkpoints
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """A single-backbone checkpoint layout: logit count, heads, and the data.zip file (relative to the data folder)."""

    num_logits: int
    heads: tuple[Head, ...]
    default_file: str
    description: str

    def build(self, name: str = "", input_size: int = 224) -> AttributeClassifier:
        return AttributeClassifier(mobilenet(self.num_logits), self.heads, input_size=input_size, name=name)


_G = Head("gender", GENDER, (0, 1))
_R = Head("race", RACE, (2, 3, 4, 5))
_A = Head("age", AGE, (6, 7))
CELEBA_MALE = 20
LAYOUTS: dict[str, Layout] = {
    "celeba80": Layout(
        80,
        (Head("gender", GENDER, (2 * CELEBA_MALE, 2 * CELEBA_MALE + 1)),),
        "2-trained-classifiers/CelebA_MobileNetLarge_08060852/epoch=9-step=12660_MobileNetLarge.pt",
        "CelebA, 40 attributes x 2 logits; gender = attribute 20 (Male): exp-1/2 training",
    ),
    "fairface6": Layout(
        6,
        (_G, _R),
        "2-trained-classifiers/fairface_MobileNetLarge_GenderRace4_09041216/epoch=9-step=3380_MobileNetLarge.pt",
        "FairFace [gender 2 | race 4]: exp-3/5/6 training",
    ),
    "fairface8": Layout(
        8,
        (_G, _R, _A),
        "2-trained-classifiers/fairface_MobileNetLarge_GenderRace4Age2_09151907/epoch=9-step=3380_MobileNetLarge.pt",
        "FairFace [gender 2 | race 4 | age 2]: exp-4 training",
    ),
    "eval-gender": Layout(
        2,
        (Head("gender", GENDER, (0, 1)),),
        "5-trained-test-classifiers/CelebA-MobileNetLarge-Gender-09191318/epoch=19-step=25320_MobileNetLarge.pt",
        "CelebA gender (female, male): evaluation",
    ),
    "eval-race": Layout(
        4,
        (Head("race", RACE, (0, 1, 2, 3)),),
        "5-trained-test-classifiers/fairface-MobileNetLarge-Race4-09191318/epoch=19-step=6760_MobileNetLarge.pt",
        "FairFace race (WMELH, Black, Indian, Asian): evaluation",
    ),
    "eval-age": Layout(
        2,
        (Head("age", AGE, (0, 1)),),
        "5-trained-test-classifiers/fairface-MobileNetLarge-Age2-09191319/epoch=19-step=6760_MobileNetLarge.pt",
        "FairFace age (young, old): evaluation",
    ),
}
EVAL_PARTS = {"gender": "eval-gender", "race": "eval-race", "age": "eval-age"}


def default_path(layout: str, data_dir: str | Path | None = None) -> Path:
    """Where the authors' checkpoint of `layout` lies once data.zip is unpacked into the data folder."""
    return data_root(data_dir) / LAYOUTS[layout].default_file


def load_state(path: str | Path, layout: str) -> dict[str, torch.Tensor]:
    """Read a mobilenet state dict (plain `torch.save(state_dict)`, safely) and check its head size for `layout`."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"classifier checkpoint {path} is a folder; expected the .pt file of layout '{layout}'")
    if not path.is_file():
        raise FileNotFoundError(
            f"classifier checkpoint {path} not found: layout '{layout}' expects the data.zip entry "
            f"{LAYOUTS[layout].default_file} (unzip data.zip into the data folder, see data/README.md), or a checkpoint "
            "of this layout given as the classifier path (e.g. one written by `python -m common.classifiers train`)."
        )
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(sd, Mapping) and "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
        sd = sd["state_dict"]
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path} is not a state dict (a mapping of parameter names to tensors)")
    if sd and all(k.startswith("module.") for k in sd):  # DataParallel wrapper
        sd = {k[len("module."):]: v for k, v in sd.items()}
    lay = LAYOUTS[layout]
    w = sd.get("classifier.3.weight")
    expected = (lay.num_logits, 1280)
    if w is None:
        raise ValueError(f"{path} has no 'classifier.3.weight': not a torchvision mobilenet_v3_large state dict")
    if tuple(w.shape) != expected:
        raise ValueError(
            f"{path}: classifier.3.weight has shape {list(w.shape)}, but layout '{layout}' expects {list(expected)} "
            f"({lay.description})"
        )
    return dict(sd)


def _load_layout(layout: str, path, input_size: int = 224) -> AttributeClassifier:
    model = LAYOUTS[layout].build(name=layout, input_size=input_size)
    sd = load_state(path if path is not None else default_path(layout), layout)
    try:
        model.nets[0].load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise RuntimeError(f"{path or default_path(layout)} does not fit layout '{layout}' (strict load): {e}") from e
    return model


# ----------------------------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------------------------


CLASSIFIERS = registry("classifier")
"""`factory(path=None, **kw) -> AttributeClassifier` by name (`load_classifier` moves it to the device and dtype)"""


def register_classifier(name: str, factory: Callable[..., AttributeClassifier] | str, synthetic: bool = False) -> None:
    """Register `factory(path=None, **kw) -> AttributeClassifier` (or a "module:attr" string imported on first use);
    `synthetic`: built in the process, CPU-sized (random weights, synthetic worlds)."""
    CLASSIFIERS.register(name, factory, synthetic=synthetic)


def list_classifiers() -> list[str]:
    return CLASSIFIERS.names()


def load_classifier(name: str, path=None, device="cpu", dtype=torch.float32, data_dir=None, **kw) -> AttributeClassifier:
    """A frozen classifier in eval mode by registry name; `path` overrides the data.zip default (for "eval": a
    mapping {"gender": p, "race": p, "age": p}, missing keys taking their defaults). Relative paths and the data.zip
    defaults resolve against `data_root(data_dir)`. `input_size` (kw) changes the crop size the backbone sees (224 for
    the authors' checkpoints). `hf:...` / `clip:...` names load hub judges (`common.hub_judges.load_hub_judge`; kw
    label_map, clip_prompts, input_size)."""
    from common.hub_judges import is_hub_name, load_hub_judge

    if is_hub_name(name):
        if path is not None:
            raise ConfigError(f"classifier '{name}' names its model itself; classifier_path must be empty (got {path})")
        model = load_hub_judge(name, data_dir=data_dir, **kw)
        return model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    for key in ("label_map", "clip_prompts"):  # config defaults are empty; a given one must not be ignored
        if kw.pop(key, None):
            raise ConfigError(f"{key} applies to hf: / clip: classifiers, not to '{name}'")
    if name not in CLASSIFIERS:
        raise CLASSIFIERS.unknown(name, ", or hf:HUB_ID_OR_FOLDER / clip:HUB_ID_OR_FOLDER")
    if isinstance(path, Mapping):
        path = {a: data_path(p, data_dir) for a, p in path.items()}
    elif path is not None:
        path = data_path(path, data_dir)
    elif name in LAYOUTS:
        path = default_path(name, data_dir)
    elif name == "eval":
        path = {a: default_path(lay, data_dir) for a, lay in EVAL_PARTS.items()}
    model = CLASSIFIERS.create(name, path=path, **kw)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def _layout_factory(layout: str):
    def factory(path=None, input_size: int = 224):
        return _load_layout(layout, path, input_size)

    return factory


def _eval_factory(path: Mapping[str, str | Path] | str | Path | None = None, input_size: int = 224):
    """The three evaluation classifiers; `path`: {"gender": file, "race": file, "age": file} (missing keys take their
    defaults) or a folder laid out like data.zip's data/ (holding 5-trained-test-classifiers/...)."""
    if isinstance(path, (str, Path)):
        root = Path(path)
        if not root.is_dir():
            raise NotADirectoryError(
                f"'eval' classifier path {root} is not a folder: pass a data.zip-style data folder or a mapping "
                "{'gender': file, 'race': file, 'age': file}"
            )
        path = {a: root / LAYOUTS[lay].default_file for a, lay in EVAL_PARTS.items()}
    paths = dict(path or {})
    unknown = set(paths) - set(EVAL_PARTS)
    if unknown:
        raise KeyError(f"'eval' classifier paths: unknown attribute(s) {sorted(unknown)}; expected {list(EVAL_PARTS)}")
    parts = [_load_layout(lay, paths.get(attr), input_size) for attr, lay in EVAL_PARTS.items()]
    heads = [Head(p.heads[0].attribute, p.heads[0].classes, p.heads[0].logits, net=i) for i, p in enumerate(parts)]
    return AttributeClassifier([p.nets[0] for p in parts], heads, input_size=input_size, name="eval")


def _random_fairface8(path=None, input_size: int = 224, seed: int = 0) -> AttributeClassifier:
    if path is not None:
        raise ValueError("'random-fairface8' has random weights and takes no path (use 'fairface8' with path=...)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LAYOUTS["fairface8"].build(name="random-fairface8", input_size=input_size)


for _name in LAYOUTS:
    register_classifier(_name, _layout_factory(_name))
register_classifier("eval", _eval_factory)
register_classifier("random-fairface8", _random_fairface8, synthetic=True)


# ----------------------------------------------------------------------------------------------------------------
# Training one's own from public label files
# ----------------------------------------------------------------------------------------------------------------

RACE7_TO_4 = {
    "White": 0,
    "Middle Eastern": 0,
    "Latino_Hispanic": 0,
    "Black": 1,
    "Indian": 2,
    "East Asian": 3,
    "Southeast Asian": 3,
}
"""FairFace's 7 races -> the 4 classes (0 WMELH, 1 Black, 2 Indian, 3 Asian)."""
FAIRFACE_AGE_BINS = ("0-2", "3-9", "10-19", "20-29", "30-39", "40-49", "50-59", "60-69", "more than 70")
FAIRFACE_GENDER = {"Female": 0, "Male": 1}
DEFAULT_OLD_FROM = 50
"""Default age cut-off: FairFace bins from 50-59 up are "old". The paper's age target is 75% young / 25% old and
its cut-off was not published; 50 keeps the visibly older faces (grey hair, wrinkles) in "old" and every adult
below 50 in "young", so the class is well defined on generated faces; 40 would put mid-life faces on the boundary."""


def age_bin_lower(label: str) -> int:
    """Lower bound in years of a FairFace age bin ("20-29" -> 20, "more than 70" -> 70)."""
    if label not in FAIRFACE_AGE_BINS:
        raise ValueError(f"unknown FairFace age bin '{label}'; expected one of {list(FAIRFACE_AGE_BINS)}")
    return 70 if label == "more than 70" else int(label.split("-")[0])


def age_label(label: str, old_from: int = DEFAULT_OLD_FROM) -> int:
    """0 young / 1 old for a FairFace age bin: old when the bin starts at `old_from` or later."""
    lowers = [age_bin_lower(b) for b in FAIRFACE_AGE_BINS]
    if old_from not in lowers[1:]:
        raise ValueError(f"age cut-off {old_from} splits a FairFace bin; choose a bin start among {lowers[1:]}")
    return int(age_bin_lower(label) >= old_from)


@dataclass
class Group:
    """One trained softmax group: target column `column` of the label matrix, logits `logits`, class names."""

    name: str
    classes: tuple[str, ...]
    logits: tuple[int, ...]


@dataclass
class Split:
    files: list[Path]
    labels: torch.Tensor  # [N, G] long


TRAIN_LAYOUTS = {
    "fairface": ("fairface8", "fairface6", "eval-race", "eval-age", "eval-gender"),
    "celeba": ("celeba80", "eval-gender"),
}


def _fairface_groups(layout: str) -> list[Group]:
    return [Group(h.attribute, h.classes, h.logits) for h in LAYOUTS[layout].heads]


def read_fairface(root: Path, layout: str, old_from: int) -> tuple[Split, Split, list[Group]]:
    """FairFace label files `fairface_label_train.csv` / `fairface_label_val.csv` (columns file, age, gender, race;
    `file` relative to `root`) -> train / val splits with one label column per head of `layout`."""
    groups = _fairface_groups(layout)

    def read(csv_name: str) -> Split:
        path = root / csv_name
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: expected FairFace's label file (columns file, age, gender, race)")
        files, rows = [], []
        with path.open(newline="") as fh:
            reader = csv.DictReader(fh)
            missing = {"file", "age", "gender", "race"} - set(reader.fieldnames or ())
            if missing:
                raise ValueError(f"{path}: missing column(s) {sorted(missing)} (expected file, age, gender, race)")
            for i, r in enumerate(reader, start=2):
                try:
                    vals = {
                        "gender": FAIRFACE_GENDER[r["gender"]],
                        "race": RACE7_TO_4[r["race"]],
                        "age": age_label(r["age"], old_from),
                    }
                except KeyError as e:
                    raise ValueError(
                        f"{path} line {i}: unknown value {e} (gender in {list(FAIRFACE_GENDER)}, race in "
                        f"{list(RACE7_TO_4)})"
                    ) from None
                except ValueError as e:
                    raise ValueError(f"{path} line {i}: {e}") from None
                files.append(root / r["file"])
                rows.append([vals[g.name] for g in groups])
        return Split(files, torch.tensor(rows, dtype=torch.long).reshape(len(rows), len(groups)))

    return read("fairface_label_train.csv"), read("fairface_label_val.csv"), groups


def read_celeba(root: Path, layout: str) -> tuple[Split, Split, list[Group]]:
    """CelebA `list_attr_celeba.txt` (count, 40 names, rows of -1/1), `list_eval_partition.txt` (0 train, 1 val,
    2 test) and `img_align_celeba/` -> splits; celeba80 trains all 40 attributes (2 logits each, attribute k at
    logits 2k, 2k+1), eval-gender only "Male"."""
    attr_file, part_file = root / "list_attr_celeba.txt", root / "list_eval_partition.txt"
    for p in (attr_file, part_file):
        if not p.is_file():
            raise FileNotFoundError(f"{p} not found: expected CelebA's list_attr_celeba.txt and list_eval_partition.txt")
    lines = attr_file.read_text().split("\n")
    names = lines[1].split()
    if len(names) != 40 or names[CELEBA_MALE] != "Male":
        raise ValueError(f"{attr_file}: line 2 should name the 40 CelebA attributes with 'Male' at index 20")
    part = {}
    for ln in part_file.read_text().split("\n"):
        if ln.strip():
            f, s = ln.split()
            part[f] = int(s)
    if layout == "celeba80":
        groups = [Group(n, ("no", "yes"), (2 * k, 2 * k + 1)) for k, n in enumerate(names)]
        groups[CELEBA_MALE] = Group("gender", GENDER, (2 * CELEBA_MALE, 2 * CELEBA_MALE + 1))
        cols = list(range(40))
    else:
        groups, cols = [Group("gender", GENDER, (0, 1))], [CELEBA_MALE]
    splits: dict[int, tuple[list, list]] = {0: ([], []), 1: ([], [])}
    for i, ln in enumerate(lines[2:], start=3):
        if not ln.strip():
            continue
        f, *vals = ln.split()
        if len(vals) != 40 or any(v not in ("-1", "1") for v in vals):
            raise ValueError(f"{attr_file} line {i}: expected a file name and 40 values of -1/1")
        if f not in part:
            raise ValueError(f"{attr_file} line {i}: {f} is not listed in {part_file}")
        if part[f] in splits:
            splits[part[f]][0].append(root / "img_align_celeba" / f)
            splits[part[f]][1].append([int(vals[c] == "1") for c in cols])
    out = [Split(fs, torch.tensor(ls, dtype=torch.long).reshape(len(ls), len(cols))) for fs, ls in splits.values()]
    return out[0], out[1], groups


class ImageFolderSet(torch.utils.data.Dataset):
    """Images -> [3, size, size] in [-1, 1] (centre square crop, bilinear resize; random h-flip when training)."""

    def __init__(self, split: Split, size: int, train: bool):
        self.split, self.size, self.train = split, size, train

    def __len__(self):
        return len(self.split.files)

    def __getitem__(self, i):
        from PIL import Image

        path = self.split.files[i]
        try:
            img = Image.open(path).convert("RGB")
        except OSError as e:
            raise OSError(f"could not read image {path} ({e})") from None
        w, h = img.size
        s = min(w, h)
        img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
        if img.size != (self.size, self.size):
            img = img.resize((self.size, self.size), Image.BILINEAR)
        x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).reshape(self.size, self.size, 3)
        x = x.permute(2, 0, 1).float() / 127.5 - 1
        if self.train and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x, self.split.labels[i]


def confusion(true: torch.Tensor, pred: torch.Tensor, k: int) -> torch.Tensor:
    """[k, k] counts, rows = true class, columns = predicted class."""
    return torch.bincount(true * k + pred, minlength=k * k).reshape(k, k)


def evaluate(model: nn.Module, loader, groups: Sequence[Group], device) -> dict:
    """Per group: confusion matrix, per-class accuracy (recall) and overall accuracy on `loader`."""
    model.eval()
    preds, trues = [], []
    with torch.no_grad():
        for x, y in loader:
            out = model(x.to(device)).float()
            preds.append(torch.stack([out[:, list(g.logits)].argmax(-1) for g in groups], 1).cpu())
            trues.append(y)
    pred, true = torch.cat(preds), torch.cat(trues)
    res = {}
    for j, g in enumerate(groups):
        cm = confusion(true[:, j], pred[:, j], len(g.classes))
        per = (cm.diag().double() / cm.sum(1).clamp(min=1)).tolist()
        res[g.name] = {
            "classes": list(g.classes),
            "confusion": cm.tolist(),
            "per_class_accuracy": {c: (a if n else None) for c, a, n in zip(g.classes, per, cm.sum(1).tolist())},
            "accuracy": float(cm.diag().sum() / cm.sum().clamp(min=1)),
        }
    return res


def _print_report(res: dict, groups: Sequence[Group], shown: Sequence[str]) -> None:
    for g in groups:
        if g.name not in shown:
            continue
        r = res[g.name]
        print(f"  {g.name}: accuracy {r['accuracy']:.4f}")
        width = max(8, *(len(c) for c in g.classes))
        print("    " + "true\\pred".ljust(width) + "".join(c.rjust(width + 1) for c in g.classes) + "  class acc")
        for c, row in zip(g.classes, r["confusion"]):
            acc = r["per_class_accuracy"][c]
            print(
                "    " + c.ljust(width) + "".join(str(v).rjust(width + 1) for v in row)
                + ("      n/a" if acc is None else f"  {acc:9.4f}")
            )
    others = [res[g.name]["accuracy"] for g in groups if g.name not in shown]
    if others:
        print(f"  mean accuracy of the other {len(others)} attributes: {sum(others) / len(others):.4f}")


def train(args: argparse.Namespace) -> Path:
    """Train a mobilenet_v3_large classifier of `args.layout` and write `{out}/{layout}.pt` (a plain state dict,
    loadable by `load_classifier(layout, path=...)`) plus `{out}/metrics.json`."""
    from tqdm import tqdm

    root = Path(args.root)
    layout = args.layout or TRAIN_LAYOUTS[args.dataset][0]
    if layout not in TRAIN_LAYOUTS[args.dataset]:
        raise ValueError(f"layout '{layout}' cannot be trained on {args.dataset}; choose from {TRAIN_LAYOUTS[args.dataset]}")
    if args.dataset == "fairface":
        tr, va, groups = read_fairface(root, layout, args.old_from)
    else:
        tr, va, groups = read_celeba(root, layout)
    if len(tr.files) == 0 or len(va.files) == 0:
        raise ValueError(f"{root}: empty split (train {len(tr.files)} images, val {len(va.files)} images)")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(args.seed)
    net = mobilenet(LAYOUTS[layout].num_logits)
    if args.init == "imagenet":
        from torchvision.models import MobileNet_V3_Large_Weights, mobilenet_v3_large

        try:
            base = mobilenet_v3_large(weights=MobileNet_V3_Large_Weights.IMAGENET1K_V1)
        except Exception as e:  # noqa: BLE001 - any download failure gets the same advice
            raise RuntimeError(
                f"could not get torchvision's ImageNet mobilenet_v3_large weights ({e}); run once with network "
                "access (they are cached in $TORCH_HOME) or pass --init random / --init PATH"
            ) from e
        sd = {k: v for k, v in base.state_dict().items() if not k.startswith("classifier.3.")}
        net.load_state_dict({**net.state_dict(), **sd}, strict=True)
    elif args.init != "random":
        net.load_state_dict(load_state(args.init, layout), strict=True)
    net.to(device)
    tl = torch.utils.data.DataLoader(
        ImageFolderSet(tr, args.image_size, True), batch_size=args.batch_size, shuffle=True,
        num_workers=args.workers, drop_last=len(tr.files) > args.batch_size,
    )
    vl = torch.utils.data.DataLoader(
        ImageFolderSet(va, args.image_size, False), batch_size=args.batch_size, num_workers=args.workers
    )
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    total = args.epochs * len(tl)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    out = Path(args.out or f"outputs/classifiers/{args.dataset}-{layout}")
    out.mkdir(parents=True, exist_ok=True)
    shown = [h.attribute for h in LAYOUTS[layout].heads]
    history = []
    for epoch in range(args.epochs):
        net.train()
        t0, seen, loss_sum = time.time(), 0, 0.0
        for x, y in tqdm(tl, desc=f"epoch {epoch + 1}/{args.epochs}", leave=False):
            x, y = x.to(device), y.to(device)
            logits = net(x)
            loss = sum(F.cross_entropy(logits[:, list(g.logits)], y[:, j]) for j, g in enumerate(groups))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            seen += len(x)
            loss_sum += loss.item() * len(x)
        res = evaluate(net, vl, groups, device)
        history.append({"epoch": epoch + 1, "train_loss": loss_sum / max(seen, 1), "val": res})
        print(f"epoch {epoch + 1}: train loss {loss_sum / max(seen, 1):.4f} ({time.time() - t0:.0f} s); validation:")
        _print_report(res, groups, shown)
        torch.save(net.state_dict(), out / f"{layout}.pt")
    meta = {
        "dataset": args.dataset, "layout": layout, "root": str(root), "image_size": args.image_size,
        "old_from": args.old_from if args.dataset == "fairface" else None, "epochs": args.epochs,
        "train_images": len(tr.files), "val_images": len(va.files), "history": history,
    }
    (out / "metrics.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"wrote {out / f'{layout}.pt'}: load it with load_classifier('{layout}', path='{out / f'{layout}.pt'}')")
    return out / f"{layout}.pt"


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m common.classifiers", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="registered classifiers and whether their data.zip files are present")
    t = sub.add_parser("train", help="train a classifier from FairFace / CelebA label files")
    t.add_argument("--dataset", choices=sorted(TRAIN_LAYOUTS), required=True)
    t.add_argument("--root", required=True, help="dataset folder (FairFace: the label CSVs + train/ val/; CelebA: "
                   "list_attr_celeba.txt, list_eval_partition.txt, img_align_celeba/)")
    t.add_argument("--layout", help="checkpoint layout (fairface: fairface8 [default], fairface6, eval-race, "
                   "eval-age, eval-gender; celeba: celeba80 [default], eval-gender)")
    t.add_argument("--old-from", type=int, default=DEFAULT_OLD_FROM,
                   help="FairFace age bins starting at this age or later are 'old' (default 50: bins 50-59 and up)")
    t.add_argument("--out", help="output folder (default outputs/classifiers/{dataset}-{layout})")
    t.add_argument("--epochs", type=int, default=10)
    t.add_argument("--batch-size", type=int, default=128)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--weight-decay", type=float, default=1e-4)
    t.add_argument("--image-size", type=int, default=224, help="training / validation crop size (224 as the authors)")
    t.add_argument("--init", default="imagenet", help="imagenet (torchvision weights), random, or a checkpoint path")
    t.add_argument("--workers", type=int, default=2)
    t.add_argument("--device", default=None)
    t.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.cmd == "list":
        for name in list_classifiers():
            if name in LAYOUTS:
                p = default_path(name)
                print(f"{name:18s} {'present' if p.is_file() else 'missing'}  {p}  ({LAYOUTS[name].description})")
            elif name == "eval":
                ok = all(default_path(lay).is_file() for lay in EVAL_PARTS.values())
                print(f"{name:18s} {'present' if ok else 'missing'}  eval-gender + eval-race + eval-age in one module")
            else:
                print(f"{name:18s} (no data.zip file)")
        from common.hub_judges import preset_lines

        print("\n" + "\n".join(preset_lines()))
    else:
        train(args)


if __name__ == "__main__":
    from common.runtime import cli

    cli(main)
