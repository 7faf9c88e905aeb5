"""Typed, validated experiment configuration.

A YAML file may `extends:` another file or a list of files (paths relative to itself; later ones override earlier
ones); the child's keys override the parents', recursively.
Command-line overrides `--set train.lr=1e-4` are applied last (values parsed as YAML). Every default lives once, in
the dataclasses below. An unknown key, a wrong type, an invalid choice or a malformed target distribution is an
error naming the file, the key path, the value, and what is valid.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
"""the default base model: the maintained hub copy of Stable Diffusion 1.5 (the original repository was taken down)"""


class ConfigError(ValueError):
    """A configuration problem; the message names the file, the key path and what is valid."""


# ----------------------------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    name: str = SD15
    """hub id or local diffusers folder (SD 1.x or SDXL, told apart by the folder), `toy` (the shipped toy world),
    `tiny` / `tiny-sdxl` (random SD- / SDXL-shaped weights, tests)"""
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    """dtype of the frozen weights; trainable tensors are always fp32. auto = bf16 on a GPU that supports it, else
    fp16 (the fast-DFT gradient in fp16 is far from fp32's unless the loss is scaled: docs/real-path.md)"""
    text_encoder_dtype: Literal["fp32", "fp16", "bf16"] | None = None
    """override for the text encoder (exp-2 keeps it in fp32); None = `dtype`"""


@dataclass
class FinetuneConfig:
    text_encoder_lora: bool = True
    unet_lora: bool = False
    rank: int = 50
    """LoRA rank; alpha = rank (scale 1), as the authors"""
    prefix_tokens: int = 0
    """> 0 trains that many soft prefix tokens instead of LoRA (exp-2); on SDXL each token gets a row in both encoders"""
    text_encoders: list[int] = field(default_factory=lambda: [1, 2])
    """which text encoders `text_encoder_lora` adapts, 1-based: SDXL's text_encoder (1) and/or text_encoder_2 (2); SD 1.x
    has only 1 (a 2 is dropped there, [2] alone is an error). On SDXL encoder 1's last layer gets no LoRA (only its
    penultimate hidden state is used, so that layer would get no gradient)"""

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        if not self.text_encoders or len(set(self.text_encoders)) != len(self.text_encoders) or not set(
                self.text_encoders) <= {1, 2}:
            raise ValueError(f"text_encoders = {self.text_encoders}: expected [1], [2] or [1, 2] (SDXL's text_encoder "
                             "and/or text_encoder_2)")
        if sorted(self.text_encoders) != [1, 2] and not self.text_encoder_lora:
            raise ValueError(f"text_encoders = {self.text_encoders}: selects text encoders for LoRA but "
                             "text_encoder_lora is false; set it to true or drop text_encoders")
        if self.prefix_tokens < 0:
            raise ValueError(f"prefix_tokens must be >= 0, got {self.prefix_tokens}")
        if self.prefix_tokens and (self.text_encoder_lora or self.unet_lora):
            raise ValueError("prefix_tokens > 0 trains only the prefix tokens: set text_encoder_lora and unet_lora to false")
        if not (self.prefix_tokens or self.text_encoder_lora or self.unet_lora):
            raise ValueError("nothing to train: enable text_encoder_lora, unet_lora or prefix_tokens")


@dataclass
class AttributeConfig:
    head: str | None = None
    """classifier output this attribute is read from (default: the attribute's own name)"""
    target: list[float] | Literal["uniform"] | None = None
    """target distribution over the classes; None = the preset's (gender/race uniform, age 75/25)"""
    factor1: float = 1.0
    """dynamic CLIP/DINO weight of an image whose target flips this attribute (lambda_img,2 / lambda_img,1)"""
    factor2: float = 1.0
    """gradient factor inside the face region of such an image"""

    def __post_init__(self):
        for f in ("factor1", "factor2"):
            v = getattr(self, f)
            if not (0 <= v <= 1) or math.isnan(v):
                raise ValueError(f"{f} = {v}: expected a number in [0, 1]")


@dataclass
class PromptsConfig:
    train: list[str] = field(default_factory=lambda: ["occupation.json:train"])
    """prompt sets `FILE:SPLIT[*REPEAT]` (see common/prompts.py); FILE is looked up in data/1-prompts (the authors'
    data.zip) then data/prompts; `toy:train` / `toy:heldout` are the toy world's"""
    val: list[str] = field(default_factory=lambda: ["occupation.json:val"])
    test: list[str] = field(default_factory=lambda: ["occupation.json:test"])
    val_limit: int | None = None
    """use only the first N prompts of each validation set (exp-5: 5)"""


@dataclass
class JudgesConfig:
    classifier: str = "celeba80"
    """registry name of the attribute classifier (`python -m common.classifiers list`)"""
    classifier_path: str | None = None
    eval_classifier: str = "eval"
    """classifier(s) of `common.evaluate`: the authors' separate evaluation heads by default"""
    agreement: str | None = None
    """a second evaluation classifier (any registry name) or null: `common.evaluate --judge2`, reporting both judges'
    bias per attribute, their agreement share and Cohen's kappa"""
    detector: str = "mtcnn"
    """face detector: mtcnn | whole-image | toy"""
    features: list[str] = field(default_factory=lambda: ["clip", "dino"])
    """image encoders of the semantics-preservation loss"""
    face_encoder: str | None = "facenet"
    """face-identity encoder for the realism loss (facenet | sfnet20 | a registered plug-in encoder | None)"""
    face_bank: str | None = None
    """face-feature bank file (.pt or the authors' face_feats.pkl); None disables the nearest-neighbour target"""
    label_map: dict[str, str] = field(default_factory=dict)
    """`hf:` judges: {model label: "attribute:class"} for labels the automatic mapping by name does not know, e.g.
    {"feminine": "gender:female"} (common/hub_judges.py)"""
    clip_prompts: dict[str, list[str]] = field(default_factory=dict)
    """`clip:` judges: {attribute: [one prompt per class, in class order]}; the attributes judged are exactly these
    keys (empty: gender, race and age with common/hub_judges.py's default prompts)"""

    def __post_init__(self):
        for label, target in self.label_map.items():
            parse_label_target(target, f"label_map.{label}")
        for attr, prompts in self.clip_prompts.items():
            check_clip_prompts(attr, prompts, f"clip_prompts.{attr}")


def parse_label_target(target: str, where: str) -> tuple[str, int]:
    """A label-map value "attribute:class" (a preset attribute and one of its class names) -> (attribute, class
    index); ValueError naming `where` otherwise."""
    from common.attributes import PRESETS

    attr, sep, cls = str(target).partition(":")
    spec = PRESETS.get(attr.strip())
    names = {a: list(p.classes) for a, p in PRESETS.items()}
    if not sep or spec is None or cls.strip() not in spec.classes:
        raise ValueError(f"{where} = {target!r}: expected 'attribute:class' with a class of {names}")
    return spec.name, spec.classes.index(cls.strip())


def check_clip_prompts(attr: str, prompts, where: str) -> None:
    """CLIP class prompts of one attribute: a preset attribute and one non-empty prompt per class; ValueError naming
    `where` otherwise."""
    from common.attributes import PRESETS

    spec = PRESETS.get(attr)
    if spec is None:
        raise ValueError(f"{where}: unknown attribute '{attr}'; expected one of {sorted(PRESETS)}")
    if (not isinstance(prompts, list | tuple) or len(prompts) != spec.num_classes
            or not all(isinstance(p, str) and p.strip() for p in prompts)):
        raise ValueError(f"{where} = {prompts!r}: expected {spec.num_classes} non-empty prompts, one per class "
                         f"{list(spec.classes)} in that order")


@dataclass
class LossConfig:
    w_img: float = 8.0
    w_face: float = 1.0
    confidence_threshold: float = 0.8
    """C: images whose expected-OT confidence is below C get no alignment target (the authors' 1 - 0.2)"""
    face_confidence: float = 0.9
    """the original face is the realism target when its prediction is at least this confident"""
    no_face_weight: float | None = None
    """CLIP/DINO weight of an image with no face; None = 1 for one attribute, min factor1 for several (authors)"""
    alignment_method: Literal["auto", "binary", "exact", "monte_carlo"] = "auto"
    joint_alignment: bool = True
    """several attributes: one transport problem over the joint space (the paper; targets are the product
    distribution) or, when false, one per attribute (matches each marginal, not the joint cells). With a near-one-hot
    classifier the joint plan spreads a confident batch's flips of one attribute over many images, each below
    `confidence_threshold`, so that attribute gets almost no targets
    (docs/toy-world.md#a-joint-plan-starves-a-confident-attribute)"""
    mc_samples: int = 100
    """Monte Carlo samples per process"""
    exact_mass: float | None = None
    """truncate exact enumeration to this probability mass (0.95 reproduces the authors' exp-6)"""
    age_asymmetric_cost: bool = False
    """reproduce the authors' exp-4 cost (the young-probability deviation doubled for an old target)"""
    keep: list[str] = field(default_factory=list)
    """classifier outputs that are NOT debiased but should stay as they were, image by image (e.g. [age] while
    debiasing gender x race): each finetuned image whose original was classified with confidence >=
    `confidence_threshold` gets a cross-entropy towards the original's class, weighted by `w_keep`"""
    w_keep: float = 1.0

    def __post_init__(self):
        if len(set(self.keep)) != len(self.keep):
            raise ValueError(f"keep = {self.keep}: expected each classifier output once")
        if self.w_keep < 0 or math.isnan(self.w_keep):
            raise ValueError(f"w_keep = {self.w_keep}: expected a number >= 0")


@dataclass
class SamplingConfig:
    train_steps: list[int] = field(default_factory=lambda: [19, 23])
    """[min, max] denoising steps, drawn once per training step for all processes"""
    val_steps: int = 25
    test_steps: int = 30
    test_images_per_prompt: int = 60
    """images per test prompt for evaluation (authors: 60 gender, 80 race, 160 gender x race and age)"""
    guidance: float = 7.5
    image_size: int = 512
    dft: Literal["fast", "reference", "naive"] = "fast"
    dft_last_k: int | None = None
    """back-propagate only through the last K denoising steps"""
    dft_chunk: int = 8
    """(image, step) pairs per U-Net call in the fast form"""
    decode_chunk: int = 2
    """images per VAE decode, with and without gradient (a 512 px decode of a whole step's images does not fit one GPU)"""
    unet_checkpointing: bool = False
    """recompute the U-Net's activations in the fast DFT's backward instead of storing them (SDXL at 1024 px)"""

    def __post_init__(self):
        if len(self.train_steps) != 2 or not 1 <= self.train_steps[0] <= self.train_steps[1]:
            raise ValueError(f"train_steps must be [min, max] with 1 <= min <= max, got {self.train_steps}")
        if self.decode_chunk < 1:
            raise ValueError(f"decode_chunk must be >= 1, got {self.decode_chunk}")
        if self.dft_last_k is not None and not 1 <= self.dft_last_k <= self.train_steps[0]:
            raise ValueError(f"dft_last_k must be in [1, train_steps[0] = {self.train_steps[0]}] or null (every step "
                             f"gets gradient), got {self.dft_last_k}")


@dataclass
class TrainConfig:
    images_per_prompt: int = 24
    """GLOBAL images per prompt per step (the alignment batch), split evenly over processes"""
    prompts_per_step: int = 1
    """prompts per optimizer step, one after the other with their gradients accumulated: the paper's 1; more average
    the per-prompt edits (e.g. biases pointing opposite ways in different prompts) into one update"""
    micro_batch: int = 4
    lr: float = 5e-5
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"
    """the paper's constant; cosine / linear decay from `lr` to 0 at `max_steps` (a quieter end point for noisy runs)"""
    weight_decay: float = 0.01
    max_steps: int = 10000
    ema_decay: float = 0.996
    checkpoint_every: int = 20
    keep_checkpoints: int = 2
    permanent_every: int = 200
    validate_every: int = 200
    val_images_per_prompt: int = 32
    seed: int = 5991
    loss_scale: float | None = None
    """static loss scale: the surrogate loss is multiplied by it and the fp32 LoRA gradients divided by it before the
    all-reduce (an overflow skips the step, as a NaN does); null = 1024 when the frozen weights are fp16, else 1"""
    allow_cpu: bool = False
    """train a real model on the CPU when no usable CUDA is found (otherwise that stops at start); the toy world and
    `tiny` models always may"""

    def __post_init__(self):
        for k in ("images_per_prompt", "prompts_per_step", "micro_batch", "max_steps"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k} must be >= 1, got {getattr(self, k)}")


@dataclass
class LoggingConfig:
    backend: Literal["wandb", "tensorboard", "csv", "none"] = "tensorboard"
    """every backend also writes RUN_DIR/metrics.csv; `csv` (= `none`) writes only that; tensorboard logs to RUN_DIR/logs,
    wandb to RUN_DIR/wandb (offline only when no credentials are found: no WANDB_API_KEY and no `wandb login`)"""
    project: str = "fair-diffusion"
    run_name: str | None = None


@dataclass
class PathsConfig:
    output_dir: str = "outputs/run"
    data_dir: str | None = None
    """where every relative data path of the config (classifiers, face banks, face encoders, prompt files) is looked up:
    null = $FAIR_DIFFUSION_DATA if set, else the repository's data/ (never the working directory)"""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    attributes: dict[str, AttributeConfig] = field(default_factory=lambda: {"gender": AttributeConfig()})
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    judges: JudgesConfig = field(default_factory=JudgesConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    source: str = field(default="<defaults>", metadata={"internal": True})

    def __post_init__(self):
        """Checks across sections (each section checks its own values when it is built)."""
        self.attribute_specs()  # the target distributions
        for head in self.loss.keep:
            if head in self.attributes:
                raise ConfigError(f"{self.source}: loss.keep lists '{head}', which is also debiased (attributes.{head}); "
                                  "an attribute is either aligned to its target or kept, not both")

    def attribute_specs(self):
        """The configured attributes as `common.attributes.Attribute`s, targets resolved, in config order."""
        from common.attributes import PRESETS, uniform

        out = []
        for name, ac in self.attributes.items():
            base = PRESETS.get(name)
            if base is None:
                raise ConfigError(f"{self.source}: attributes.{name}: unknown attribute; presets are {sorted(PRESETS)}")
            target = ac.target
            if target == "uniform":
                target = uniform(base.num_classes)
            try:
                out.append(base.with_target(target))
            except ValueError as e:
                raise ConfigError(f"{self.source}: attributes.{name}.target = {target}: {e}") from None
        return out

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("source")
        return d


# ----------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------


REPO = Path(__file__).resolve().parents[1]


def data_root(data_dir: str | Path | None = None) -> Path:
    """The data folder: `data_dir` when given (a relative one is taken from the repository root), else
    $FAIR_DIFFUSION_DATA, else the repository's data/."""
    import os

    if data_dir is None:
        data_dir = os.environ.get("FAIR_DIFFUSION_DATA") or REPO / "data"
    p = Path(data_dir).expanduser()
    return p if p.is_absolute() else REPO / p


def data_path(path: str | Path, data_dir: str | Path | None = None) -> Path:
    """A config's data path: absolute stays, relative resolves against `data_root(data_dir)`."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else data_root(data_dir) / p


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "attributes":
            out[k] = _merge(out[k], v)
        elif isinstance(v, dict) and isinstance(out.get(k), dict) and k == "attributes":
            # an attribute map replaces the parent's set of attributes, but each entry merges with its namesake
            out[k] = {a: _merge(out[k].get(a) or {}, av or {}) for a, av in v.items()}
        else:
            out[k] = v
    return out


def _read_yaml(path: Path, chain: tuple[Path, ...] = ()) -> dict:
    path = path.resolve()
    if path in chain:
        raise ConfigError(f"{path}: `extends` cycle through {' -> '.join(map(str, chain))}")
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    parents = data.pop("extends", None)
    if parents is None:
        return data
    if isinstance(parents, str):
        parents = [parents]
    if not isinstance(parents, list) or not all(isinstance(p, str) for p in parents):
        raise ConfigError(f"{path}: extends = {parents!r}: expected a file name or a list of file names")
    merged: dict = {}
    for parent in parents:  # later parents override earlier ones; the file itself overrides them all
        merged = _merge(merged, _read_yaml(path.parent / parent, chain + (path,)))
    return _merge(merged, data)


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return f"mapping of {_type_name(typing.get_args(tp)[1])}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp, where: str, source: str):
    """Check/convert `value` to type `tp`; raise ConfigError naming `where`."""
    origin = typing.get_origin(tp)
    bad = lambda: ConfigError(f"{source}: {where} = {value!r}: expected {_type_name(tp)}")  # noqa: E731
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for alt in typing.get_args(tp):
            try:
                return _convert(value, alt, where, source)
            except ConfigError as e:
                errors.append(e)
        raise bad()
    if tp is type(None):
        if value is None:
            return None
        raise bad()
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        close = difflib.get_close_matches(str(value), [str(a) for a in typing.get_args(tp)], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{source}: {where} = {value!r}: expected one of {_type_name(tp)}{hint}")
    if origin is list:
        if not isinstance(value, list):
            raise bad()
        (item,) = typing.get_args(tp)
        return [_convert(v, item, f"{where}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise bad()
        _, item = typing.get_args(tp)
        return {str(k): _convert(v if v is not None else {}, item, f"{where}.{k}", source) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {where or 'top level'} = {value!r}: expected a mapping of the keys of {tp.__name__}")
        return _build(tp, value, where, source)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad()
    if tp is float:
        if isinstance(value, bool):
            raise bad()
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, str):  # YAML reads 5e-5 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise bad() from None
        raise bad()
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad()
    raise bad()


def _build(cls, data: dict, prefix: str, source: str):
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    kwargs = {"source": source} if "source" in {f.name for f in dataclasses.fields(cls)} else {}
    for key, value in data.items():
        where = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{source}: unknown key '{where}'{hint}; valid keys here: {', '.join(fields)}")
        kwargs[key] = _convert(value, hints[key], where, source)
    try:
        return cls(**kwargs)
    except ConfigError:  # already names the file and the key
        raise
    except ValueError as e:
        key = str(e).split(" = ", 1)[0]  # "w_keep = -1: ..." names its key: spell out the whole path
        if prefix and key in fields:
            raise ConfigError(f"{source}: {prefix}.{e}") from None
        raise ConfigError(f"{source}: {prefix or 'config'}: {e}") from None


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b=c` -> (['a', 'b'], yaml-parsed c)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. train.lr=1e-4")
    key, raw = item.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a config file (with `extends`) and apply `--set` overrides. Validates everything, including targets."""
    source = str(path) if path is not None else "<defaults>"
    data = _read_yaml(Path(path)) if path is not None else {}
    for item in overrides or []:
        keys, value = parse_override(item)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item}: '{k}' is not a section")
        node[keys[-1]] = value
        source_note = " (+ --set overrides)"
        if not source.endswith(source_note):
            source += source_note
    return _build(Config, data, "", source)  # every check runs in the dataclasses' __post_init__


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the fully resolved config (every default spelled out) as YAML."""
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def add_config_args(parser) -> None:
    """`--config FILE` and repeatable `--set KEY=VALUE` for a command-line tool."""
    parser.add_argument("--config", required=True, help="experiment YAML (may `extends:` a base file)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set train.lr=1e-4 (repeatable)")
