"""Image and face-identity encoders for the regularisers and metrics, and the nearest-neighbour face bank.

- Image encoders (`load_image_encoder`): CLIP vision `image_embeds` (laion/CLIP-ViT-H-14-laion2B-s32B-b79K, CLIP
  mean/std) and DINOv2 CLS (facebook/dinov2-base: the weights of torch.hub's dinov2_vitb14, ImageNet mean/std); both
  take whole images [N, 3, H, W] in [-1, 1], resize them to 224 and return L2-normalised fp32 [N, D].
- Face encoders (`load_face_encoder`): aligned faces [N, 3, 112, 112] in [-1, 1] -> normalize(f(x) + f(hflip x))
  [N, 512]: facenet-pytorch InceptionResnetV1 (VGGFace2) or the data.zip OpenSphere SFNet-20
  (docs/method.md#face-identity-backbone).
- `FaceBank`: a normalised [M, D] matrix of real-face features with batched top-1 dot-product search; built by
  `python -m common.features build-bank --images DIR --out FILE`.
Every encoder applies its own normalisation and input size, may hold fp16/bf16 weights, and passes gradients to the
image. Hub weights go through `from_pretrained` (a hub id or a local folder); offline without a copy: one clear error.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import pickle
import types
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from common.config import data_path, data_root
from common.registry import registry

CLIP_ID = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
DINO_ID = "facebook/dinov2-base"
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SFNET20_FILE = "4-opensphere_checkpoints/opensphere_checkpoints/20220424_210641/models/backbone_100000.pth"
FACENET_URL_FILE = "20180402-114759-vggface2.pt"


def _resize(x: torch.Tensor, size: int, antialias: bool) -> torch.Tensor:
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=antialias)


# ----------------------------------------------------------------------------------------------------------------
# Whole-image encoders: CLIP, DINOv2
# ----------------------------------------------------------------------------------------------------------------


class ImageEncoder(nn.Module):
    """images [N, 3, H, W] in [-1, 1] -> L2-normalised fp32 embeddings [N, dim].

    Resizes to `input_size` (bilinear; `antialias=False` by default, as the authors' torchvision 0.16 tensor Resize),
    maps to [0, 1], normalises with the model's mean / std, runs the model in its own dtype, and reads `image_embeds`
    (CLIP) or the final-layer-normed CLS token (DINOv2: `pooler_output`, = last_hidden_state[:, 0], which is what
    torch.hub's dinov2 forward returns).
    """

    def __init__(self, model: nn.Module, kind: str, input_size: int, mean, std, antialias: bool = False, name=""):
        super().__init__()
        if kind not in ("clip", "dino"):
            raise ValueError(f"ImageEncoder kind must be 'clip' or 'dino', got '{kind}'")
        self.model, self.kind, self.input_size, self.antialias, self.name = model, kind, input_size, antialias, name
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    @property
    def dim(self) -> int:
        cfg = self.model.config
        return cfg.projection_dim if self.kind == "clip" else cfg.hidden_size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = _resize(images.float(), self.input_size, self.antialias)
        x = ((x + 1) / 2 - self.mean) / self.std
        x = x.to(next(self.model.parameters()).dtype)
        out = self.model(pixel_values=x)
        emb = out.image_embeds if self.kind == "clip" else out.pooler_output
        return F.normalize(emb.float(), dim=-1)


class _UnexpectedOnlyReport:
    """Drops transformers' load report when all it lists is UNEXPECTED weights (checked by the caller); a report with
    missing, mismatched or converted weights is still printed."""

    def filter(self, record) -> bool:
        msg = record.getMessage()
        return "LOAD REPORT" not in msg or any(w in msg for w in ("MISSING", "MISMATCH", "CONVERSION"))


def _from_pretrained(cls, source: str, what: str, other_parts: tuple[str, ...] = ()):
    """Strict load: every weight of `cls` must be in the files, and the files may hold more only under `other_parts`
    (e.g. the text tower of a whole CLIP checkpoint, which the vision encoder does not use): then transformers' report
    of those extras is not printed. Anything else is one error sentence."""
    import logging

    log, quiet = logging.getLogger("transformers.modeling_utils"), _UnexpectedOnlyReport()
    log.addFilter(quiet)
    try:
        model, info = cls.from_pretrained(source, output_loading_info=True)
    except OSError as e:
        if Path(source).expanduser().exists():
            raise
        raise OSError(
            f"Could not load the {what} weights '{source}' (no local copy, and the hub is unreachable or "
            f"HF_HUB_OFFLINE=1). Download them on a connected machine (`huggingface-cli download {source}`) or pass "
            "path= a local folder holding them."
        ) from e
    except RuntimeError as e:  # shape mismatches: transformers printed its report above
        raise ValueError(f"'{source}' does not hold {what} weights of the shapes {cls.__name__} expects (see the "
                         "load report above)") from e
    finally:
        log.removeFilter(quiet)
    missing = sorted(info.get("missing_keys") or [])
    extra = sorted(k for k in info.get("unexpected_keys") or [] if not k.startswith(other_parts))
    if missing or extra:
        raise ValueError(f"'{source}' does not hold the {what} weights that {cls.__name__} expects: "
                         f"missing {missing[:3]}{' ...' if len(missing) > 3 else ''} ({len(missing)}), "
                         f"unexpected {extra[:3]}{' ...' if len(extra) > 3 else ''} ({len(extra)})")
    return model


def _clip(path=None, antialias: bool = False) -> ImageEncoder:
    from transformers import CLIPVisionModelWithProjection

    model = _from_pretrained(CLIPVisionModelWithProjection, str(path or CLIP_ID), "CLIP vision",
                             other_parts=("text_model.", "text_projection.", "logit_scale"))
    return ImageEncoder(model, "clip", model.config.image_size, CLIP_MEAN, CLIP_STD, antialias, name="clip")


def hub_position_embeddings(embeddings_module, embeddings: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """DINOv2 position embeddings for a (height, width) input, resized as torch.hub's dinov2 does: bicubic with the
    scale factor (new grid + 0.1) / old grid (transformers resizes to the exact grid size instead, which samples the
    grid slightly differently). Bound to a transformers `Dinov2Embeddings` as its `interpolate_pos_encoding`."""
    pos = embeddings_module.position_embeddings
    n_old = pos.shape[1] - 1
    ph, pw = embeddings_module.patch_embeddings.patch_size
    gh, gw = height // ph, width // pw
    if embeddings.shape[1] - 1 == n_old and gh == gw:
        return pos
    m = math.isqrt(n_old)
    grid = pos[:, 1:].float().reshape(1, m, m, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=((gh + 0.1) / m, (gw + 0.1) / m), mode="bicubic", align_corners=False)
    if grid.shape[-2:] != (gh, gw):
        raise RuntimeError(f"DINOv2 position grid resized to {list(grid.shape[-2:])}, expected {[gh, gw]}")
    grid = grid.permute(0, 2, 3, 1).reshape(1, gh * gw, -1)
    return torch.cat([pos[:, :1].float(), grid], 1).to(pos.dtype)


def _use_hub_position_embeddings(model: nn.Module) -> nn.Module:
    model.embeddings.interpolate_pos_encoding = types.MethodType(hub_position_embeddings, model.embeddings)
    return model


def _dino(path=None, antialias: bool = False) -> ImageEncoder:
    from transformers import Dinov2Model

    model = _use_hub_position_embeddings(_from_pretrained(Dinov2Model, str(path or DINO_ID), "DINOv2"))
    # 224 input as the authors (img_size_small); the config's 518 is only the position-embedding grid (37 x 37).
    return ImageEncoder(model, "dino", 224, IMAGENET_MEAN, IMAGENET_STD, antialias, name="dino")


def _tiny_clip(path=None, antialias: bool = False, seed: int = 0) -> ImageEncoder:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    if path is not None:
        raise ValueError("'tiny-clip' has random weights and takes no path")
    cfg = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
        patch_size=8, projection_dim=16, initializer_range=0.2,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPVisionModelWithProjection(cfg)
    return ImageEncoder(model, "clip", 32, CLIP_MEAN, CLIP_STD, antialias, name="tiny-clip")


def _tiny_dino(path=None, antialias: bool = False, seed: int = 0) -> ImageEncoder:
    from transformers import Dinov2Config, Dinov2Model

    if path is not None:
        raise ValueError("'tiny-dino' has random weights and takes no path")
    # position grid 5 x 5 (40 px) but 32 px input, so the hub position resize runs as it does for the real model
    cfg = Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2, image_size=40, patch_size=8,
        initializer_range=0.2,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _use_hub_position_embeddings(Dinov2Model(cfg))
    return ImageEncoder(model, "dino", 32, IMAGENET_MEAN, IMAGENET_STD, antialias, name="tiny-dino")


# ----------------------------------------------------------------------------------------------------------------
# Face-identity encoders
# ----------------------------------------------------------------------------------------------------------------


class SFNet20(nn.Module):
    """OpenSphere "sfnet20_deprecated" (docs/method.md#face-identity-backbone), written from its description.

    [N, 3, 112, 112] in [-1, 1] -> [N, 512]. Four stages of 64/128/256/512 channels; each starts with a 3x3 stride-2
    convolution (bias) + ReLU, then k = 1, 2, 4, 1 residual blocks x + relu(conv2(relu(conv1(x)))); no normalisation;
    112 -> 7, flatten (channel-major), fc Linear(25088, 512). Keys: layer{s}.0.conv1.*, layer{s}.{j}.conv{1,2}.*, fc.*.
    """

    class Down(nn.Module):
        def __init__(self, cin: int, cout: int):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=True)

        def forward(self, x):
            return F.relu(self.conv1(x))

    class Block(nn.Module):
        def __init__(self, c: int):
            super().__init__()
            self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=True)
            self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=True)

        def forward(self, x):
            return x + F.relu(self.conv2(F.relu(self.conv1(x))))

    def __init__(self, channels=(64, 128, 256, 512), blocks=(1, 2, 4, 1), out_dim: int = 512, input_size: int = 112):
        super().__init__()
        cin = 3
        for s, (c, k) in enumerate(zip(channels, blocks), start=1):
            setattr(self, f"layer{s}", nn.Sequential(self.Down(cin, c), *[self.Block(c) for _ in range(k)]))
            cin = c
        side = input_size // 2 ** len(channels)
        self.fc = nn.Linear(cin * side * side, out_dim)
        self.num_stages = len(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for s in range(1, self.num_stages + 1):
            x = getattr(self, f"layer{s}")(x)
        return self.fc(torch.flatten(x, 1))


class FaceEncoder(nn.Module):
    """aligned [N, 3, 112, 112] in [-1, 1] -> normalize(net(x') + net(hflip x')) [N, D] fp32, where x' is the face
    resized to `input_size` and mapped as `scale * x + shift` into the net's input range. Both views run as one batch."""

    def __init__(self, net: nn.Module, input_size: int, scale: float = 1.0, shift: float = 0.0, name=""):
        super().__init__()
        self.net, self.input_size, self.scale, self.shift, self.name = net, input_size, scale, shift, name

    def forward(self, aligned: torch.Tensor) -> torch.Tensor:
        x = _resize(aligned.float(), self.input_size, antialias=False) * self.scale + self.shift
        x = torch.cat([x, x.flip(-1)]).to(next(self.net.parameters()).dtype)
        f = self.net(x).float()
        n = aligned.shape[0]
        return F.normalize(f[:n] + f[n:], dim=-1)


def load_sfnet20_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The OpenSphere backbone file (DataParallel `module.`-prefixed state dict), prefix removed, read safely."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"SFNet-20 face-ID weights {path} not found: expected the data.zip entry {SFNET20_FILE} (unzip data.zip "
            "into the data folder, see data/README.md); or use the 'facenet' face encoder instead (with a matching "
            "face bank)."
        )
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path} is not a state dict of tensors")
    bad = [k for k in sd if not k.startswith("module.")]
    if bad:
        raise ValueError(f"{path}: expected DataParallel keys prefixed 'module.', found e.g. '{bad[0]}'")
    return {k[len("module."):]: v for k, v in sd.items()}


def _check_opensphere_config(weights: Path) -> None:
    """If the OpenSphere config.yml lies beside models/, its backbone type must be an sfnet20."""
    cfg = weights.parent.parent / "config.yml"
    if not cfg.is_file():
        return
    import yaml

    net = (((yaml.safe_load(cfg.read_text()) or {}).get("model") or {}).get("backbone") or {}).get("net") or {}
    kind = str(net.get("type", ""))
    if "sfnet20" not in kind.lower():
        raise ValueError(f"{cfg}: model.backbone.net.type is '{kind}', but this loader builds sfnet20 only")


def _sfnet20(path=None) -> FaceEncoder:
    p = Path(path) if path is not None else data_root() / SFNET20_FILE
    sd = load_sfnet20_state(p)
    _check_opensphere_config(p)
    net = SFNet20()
    try:
        net.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise RuntimeError(f"{p} does not fit SFNet-20 (strict load after removing 'module.'): {e}") from e
    return FaceEncoder(net, 112, name="sfnet20")


def _facenet_module(pretrained: bool, path=None) -> nn.Module:
    from facenet_pytorch import InceptionResnetV1

    if not pretrained:
        return InceptionResnetV1(pretrained=None)
    if path is None:
        from facenet_pytorch.models.inception_resnet_v1 import get_torch_home

        cached = Path(get_torch_home()) / "checkpoints" / FACENET_URL_FILE
        if not cached.is_file():
            try:
                return InceptionResnetV1(pretrained="vggface2")  # facenet-pytorch's own download + cache
            except Exception as e:  # noqa: BLE001 - any download failure gets the same advice
                raise OSError(
                    f"Could not get facenet-pytorch's VGGFace2 weights ({e}): no cached {cached} and the download "
                    f"failed. Fetch {FACENET_URL_FILE} from the facenet-pytorch v2.2.9 release on a connected "
                    f"machine and put it at {cached}, or pass path= to it."
                ) from e
        path = cached
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"facenet weights {path} not found (expected facenet-pytorch's {FACENET_URL_FILE})")
    sd = torch.load(path, map_location="cpu", weights_only=True)
    net = InceptionResnetV1(pretrained=None)
    if "logits.weight" in sd:  # the released file carries the VGGFace2 classification layer
        net.logits = nn.Linear(512, sd["logits.weight"].shape[0])
    try:
        net.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise RuntimeError(f"{path} does not fit facenet-pytorch's InceptionResnetV1 (strict load): {e}") from e
    return net


def _facenet(path=None, pretrained: bool = True) -> FaceEncoder:
    # facenet expects 160 x 160 faces standardised as (p - 127.5) / 128 for p in [0, 255]: p = 127.5 (x + 1).
    return FaceEncoder(_facenet_module(pretrained, path), 160, scale=127.5 / 128, name="facenet")


def _facenet_random(path=None, seed: int = 0) -> FaceEncoder:
    if path is not None:
        raise ValueError("'facenet-random' has random weights and takes no path (use 'facenet' with path=...)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        enc = _facenet(pretrained=False)
    enc.name = "facenet-random"
    return enc


# ----------------------------------------------------------------------------------------------------------------
# Registries and loaders
# ----------------------------------------------------------------------------------------------------------------

IMAGE_ENCODERS = registry("image encoder")
"""`factory(path=None, **kw) -> module` by name; random test ones and the plug-ins' are `synthetic`"""
IMAGE_ENCODERS.register("clip", _clip)
IMAGE_ENCODERS.register("dino", _dino)
IMAGE_ENCODERS.register("tiny-clip", _tiny_clip, synthetic=True)
IMAGE_ENCODERS.register("tiny-dino", _tiny_dino, synthetic=True)
FACE_ENCODERS = registry("face encoder")
"""`factory(path=None, **kw) -> module` by name"""
FACE_ENCODERS.register("facenet", _facenet)
FACE_ENCODERS.register("facenet-random", _facenet_random, synthetic=True)
FACE_ENCODERS.register("sfnet20", _sfnet20)


def register_image_encoder(name: str, factory, synthetic: bool = False) -> None:
    """`factory(path=None, **kw) -> module`, or a "module:attr" string imported on first use."""
    IMAGE_ENCODERS.register(name, factory, synthetic=synthetic)


def register_face_encoder(name: str, factory, synthetic: bool = False) -> None:
    """`factory(path=None, **kw) -> module`, or a "module:attr" string imported on first use."""
    FACE_ENCODERS.register(name, factory, synthetic=synthetic)


def _load(encoders, name: str, path, device, dtype, kw) -> nn.Module:
    enc = encoders.create(name, path=path, **kw)
    return enc.to(device=device, dtype=dtype).eval().requires_grad_(False)


def load_image_encoder(name: str, path=None, device="cpu", dtype=torch.float32, **kw) -> nn.Module:
    """Frozen whole-image encoder: (images [N, 3, H, W] in [-1, 1]) -> [N, D] L2-normalised fp32, differentiable.
    Names: clip, dino (`path` = another hub id or a local folder), tiny-clip, tiny-dino (random small, tests), and the
    plug-ins' (the toy world's).
    `antialias=True` (kw) antialiases the resize to 224."""
    enc = _load(IMAGE_ENCODERS, name, path, device, dtype, kw)
    if isinstance(enc, ImageEncoder):  # the normalisation constants stay fp32
        enc.mean, enc.std = enc.mean.float(), enc.std.float()
    return enc


def load_face_encoder(name: str, path=None, device="cpu", dtype=torch.float32, data_dir=None, **kw) -> nn.Module:
    """Frozen face-identity encoder: (aligned [N, 3, 112, 112] in [-1, 1]) -> [N, 512] normalize(f(x) + f(flip x)).
    Names: facenet (VGGFace2), facenet-random (tests), sfnet20 (data.zip OpenSphere backbone). A relative `path` and
    sfnet20's data.zip default resolve against `data_root(data_dir)`."""
    if path is not None:
        path = data_path(path, data_dir)
    elif name == "sfnet20":
        path = data_root(data_dir) / SFNET20_FILE
    return _load(FACE_ENCODERS, name, path, device, dtype, kw)


# ----------------------------------------------------------------------------------------------------------------
# Face bank
# ----------------------------------------------------------------------------------------------------------------


def _safe_load_from_bytes(b: bytes):
    return torch.load(io.BytesIO(b), map_location="cpu", weights_only=True)


class _RestrictedUnpickler(pickle.Unpickler):
    """Reads pickles of tuples / lists / dicts of torch tensors and numpy arrays, nothing else: a torch storage is
    rebuilt by `torch.load(weights_only=True)` instead of torch's own unrestricted loader."""

    ALLOWED = {
        ("torch._utils", "_rebuild_tensor_v2"),
        ("torch._utils", "_rebuild_tensor"),
        ("collections", "OrderedDict"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module, name):
        if (module, name) == ("torch.storage", "_load_from_bytes"):
            return _safe_load_from_bytes
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load '{module}.{name}': only tensors and arrays are allowed")


def _as_feats(obj, path: Path) -> torch.Tensor:
    import numpy as np

    if isinstance(obj, dict):
        if "feats" not in obj:
            raise ValueError(f"{path}: a dict face bank needs the key 'feats', found {sorted(obj)}")
        obj = obj["feats"]
    elif isinstance(obj, (tuple, list)):
        obj = obj[0]  # the authors' face_feats.pkl: (face_feats, labels...)
    if isinstance(obj, np.ndarray):
        obj = torch.from_numpy(obj)
    if not isinstance(obj, torch.Tensor) or obj.ndim != 2:
        raise ValueError(f"{path}: expected a face-feature matrix [M, D], got {type(obj).__name__}")
    return obj


class FaceBank:
    """Real-face features, L2-normalised fp32 [M, D], with batched top-1 dot-product (cosine) search."""

    def __init__(self, feats: torch.Tensor):
        if feats.ndim != 2 or feats.shape[0] == 0:
            raise ValueError(f"FaceBank needs a non-empty [M, D] matrix, got shape {list(feats.shape)}")
        self.feats = F.normalize(feats.detach().float(), dim=-1)

    @classmethod
    def load(cls, path: str | Path, device="cpu") -> FaceBank:
        """From a .pt (a tensor or {"feats": tensor}, as `build-bank` writes) or the authors' face_feats.pkl (a pickled
        tuple whose element 0 is [M, 512]), read without executing arbitrary pickled code."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"face bank {path} not found: expected a data.zip entry 3-face-features/*/face_feats.pkl (with the "
                "sfnet20 encoder) or a bank built with `python -m common.features build-bank --images DIR --out FILE`."
            )
        if path.suffix == ".pkl":
            with path.open("rb") as fh:
                obj = _RestrictedUnpickler(fh).load()
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        return cls(_as_feats(obj, path)).to(device)

    def to(self, device) -> FaceBank:
        self.feats = self.feats.to(device)
        return self

    def __len__(self) -> int:
        return self.feats.shape[0]

    @torch.no_grad()
    def nearest_index(self, f: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
        """f [N, D] -> LongTensor [N]: index of the bank row with the largest dot product (chunks of `chunk` rows)."""
        if f.ndim != 2 or f.shape[1] != self.feats.shape[1]:
            raise ValueError(f"query features {list(f.shape)} do not match the bank's dimension {self.feats.shape[1]}")
        f = f.detach().float().to(self.feats.device)
        return torch.cat([(q @ self.feats.T).argmax(1) for q in f.split(chunk)]) if len(f) else f.new_zeros(0).long()

    def nearest(self, f: torch.Tensor) -> torch.Tensor:
        """f [N, D] -> [N, D]: the top-1 bank features (constants, no gradient)."""
        return self.feats[self.nearest_index(f)]


# ----------------------------------------------------------------------------------------------------------------
# build-bank
# ----------------------------------------------------------------------------------------------------------------

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def _read_image(path: Path) -> torch.Tensor:
    from PIL import Image

    img = Image.open(path).convert("RGB")
    x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).reshape(img.size[1], img.size[0], 3)
    return x.permute(2, 0, 1).float() / 127.5 - 1


def build_bank(
    images: str | Path, out: str | Path, encoder: str = "facenet", detector: str = "mtcnn", batch_size: int = 16,
    device="cpu", encoder_path=None,
) -> dict:
    """Detect, align and encode the largest face of every image under `images` (recursive; images of equal size
    batched together) and save {"feats": [M, D], "files": [...], "encoder": name} to `out`. Images without a face
    are listed in the returned dict and in `{out}.noface.txt`."""
    from tqdm import tqdm

    from common.faces import detect, get_detector

    root = Path(images)
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTS)
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTS)}) under {root}")
    enc = load_face_encoder(encoder, path=encoder_path, device=device)
    det = get_detector(detector)
    feats, used, noface = [], [], []
    pending: dict[tuple[int, int], list[tuple[Path, torch.Tensor]]] = {}

    def flush(key):
        batch = pending.pop(key)
        x = torch.stack([t for _, t in batch]).to(device)
        faces = detect(x, det)
        if faces.found.any():
            with torch.no_grad():
                feats.append(enc(faces.aligned[faces.found]).cpu())
        for (p, _), ok in zip(batch, faces.found.tolist()):
            (used if ok else noface).append(str(p.relative_to(root)))

    for p in tqdm(files, desc="build-bank"):
        t = _read_image(p)
        key = tuple(t.shape[-2:])
        pending.setdefault(key, []).append((p, t))
        if len(pending[key]) >= batch_size:
            flush(key)
    for key in list(pending):
        flush(key)
    if not used:
        raise ValueError(f"no face found in any of the {len(files)} images under {root}")
    bank = {"feats": F.normalize(torch.cat(feats), dim=-1), "files": used, "encoder": encoder}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(bank, out)
    if noface:
        Path(f"{out}.noface.txt").write_text("\n".join(noface) + "\n")
    print(f"wrote {out}: {len(used)} faces from {len(files)} images ({len(noface)} without a face)")
    return {**bank, "noface": noface}


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m common.features", description="Face-feature bank tools.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build-bank", help="detect + align + encode every image of a folder into a face bank")
    b.add_argument("--images", required=True, help="folder of images (searched recursively)")
    b.add_argument("--out", required=True, help="output .pt file")
    b.add_argument("--encoder", default="facenet", help="face encoder name (facenet, sfnet20, ...)")
    b.add_argument("--encoder-path", default=None, help="weights file of the encoder (default: its usual place)")
    b.add_argument("--detector", default="mtcnn")
    b.add_argument("--batch-size", type=int, default=16)
    b.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    build_bank(args.images, args.out, args.encoder, args.detector, args.batch_size, args.device, args.encoder_path)


if __name__ == "__main__":
    from common.runtime import cli

    cli(main)
