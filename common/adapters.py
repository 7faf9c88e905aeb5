"""What finetuning trains, and the files it is saved in.

- LoRA (peft) on the text encoder (`q/k/v/out_proj`, `fc1`, `fc2`) and/or the U-Net (`to_q/k/v`, `to_out.0`), alpha =
  rank (scale 1), Gaussian init (A ~ N(0, 1/r^2), B = 0), LoRA tensors in fp32 over a frozen base of any dtype.
- Prefix soft tokens (exp-2): `<common-token1..n>` added to the tokenizer; a separate fp32 `[n, D]` parameter is
  spliced into the token-embedding output wherever those ids occur (the same as editing those embedding rows, as
  textual inversion does, but only these rows are trainable).
- EMA of the trainable tensors with the authors' warm-up.
- Files: the diffusers LoRA format (`pytorch_lora_weights.safetensors`, loadable by `pipe.load_lora_weights`), a
  textual-inversion file per prefix token (loadable by `pipe.load_textual_inversion`), and a strict importer of the
  authors' released `.pth` files (`text_encoder_lora_EMA.pth`, `unet_lora_EMA.pth`, `prefix_embedding_EMA.pth`),
  which converts them to those formats from the files alone or checks them against a base model.

Trainable names are stable and independent of peft's adapter naming: `text_encoder.<module>.lora_A.weight`,
`unet.<module>.lora_B.weight`, `prefix.embeddings`.

SDXL: LoRA on either or both text encoders (`text_encoder_2.<module>.lora_A.weight`; text_encoder's last layer is
left out, as SDXL conditions on its penultimate hidden state) and the U-Net, written by
`StableDiffusionXLPipeline.save_lora_weights`; each prefix token gets a row in both encoders (`prefix.embeddings`
`[n, D1]`, `prefix_2.embeddings` `[n, D2]`; 768 + 1280 on the real model), written as diffusers' SDXL embeddings file
(`clip_l`, `clip_g`). An SDXL export into SD 1.x components, or the reverse, is refused naming both models.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import json
import random
import re
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

TE_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
ADAPTER = "default"
"""peft adapter name of the adapters this module adds (and trains)"""
LORA_FILE = "pytorch_lora_weights.safetensors"
TI_FILE = "learned_embeds-{i}.safetensors"
"""textual-inversion file of prefix token i (1-based): {"<common-token{i}>": Tensor[D]} (diffusers' format)"""
PREFIX_TOKEN = "<common-token{i}>"
PREFIX_KEY = "prefix.embeddings"
PREFIX_KEY_2 = "prefix_2.embeddings"
"""SDXL: the prefix tokens' rows in text_encoder_2, `[n, D2]` (`PREFIX_KEY` holds text_encoder's)"""
LORA_PARTS = ("text_encoder", "text_encoder_2", "unet")
"""the models that can carry LoRA (text_encoder_2: SDXL only); their trainable names start with the part and a dot"""
SDXL_TI_FILE = "learned_embeds_sdxl.safetensors"
"""SDXL prefix tokens: {"clip_l": Tensor[n, D1], "clip_g": Tensor[n, D2]} (row i: token i; diffusers' SDXL embeddings
layout), the tokens in the file's metadata "tokens" (a JSON list): `pipe.load_textual_inversion(emb["clip_l"],
token=tokens, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)`, the same with clip_g and the _2 parts"""
SDXL_TI_KEYS = ("clip_l", "clip_g")
INFO_FILE = "adapter_info.json"

RELEASED_FILES = {
    "text_encoder": ("text_encoder_lora_EMA.pth", "text_encoder_lora.pth"),
    "unet": ("unet_lora_EMA.pth", "unet_lora.pth"),
    "prefix": ("prefix_embedding_EMA.pth", "prefix_embedding.pth"),
}
"""the authors' exported file names per part: (EMA, current weights)"""


class CheckpointError(ValueError):
    """A weight file or state dict that does not fit; the message names the file, the key and what was expected."""


# ----------------------------------------------------------------------------------------------------------------
# LoRA
# ----------------------------------------------------------------------------------------------------------------


def _lora_layers(model: nn.Module, adapter: str = ADAPTER) -> list[tuple[str, nn.Module]]:
    """(module name, peft LoRA layer) for every layer of `model` that holds adapter `adapter`, in module order."""
    from peft.tuners.lora import LoraLayer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer) and adapter in m.lora_A]


def _lora_config(rank: int, targets: Sequence[str], layers: Sequence[int] | None = None):
    """The peft config of every LoRA this project adds or writes (shared so the exported metadata cannot drift);
    `layers`: only those encoder layers (peft's `layers_to_transform`), else every matching module."""
    from peft import LoraConfig

    extra = {} if layers is None else {"layers_to_transform": list(layers), "layers_pattern": "layers"}
    return LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=list(targets), **extra)


def model_kind(components) -> str:
    """"SDXL" or "SD 1.x" (the two families of components this project runs)."""
    return "SDXL" if getattr(components, "is_sdxl", False) else "SD 1.x"


def _model_words(components) -> str:
    """"the SDXL model 'NAME'" (or "this SD 1.x model" without a name), for error sentences."""
    name = getattr(components, "name", "")
    return f"the {model_kind(components)} model '{name}'" if name else f"this {model_kind(components)} model"


def _lora_models(components) -> list[tuple[str, nn.Module]]:
    """(part, model) for each model of `components` that can carry LoRA, in `LORA_PARTS` order."""
    return [(part, getattr(components, part)) for part in LORA_PARTS if getattr(components, part, None) is not None]


def add_lora(components, text_encoder: bool, unet: bool, rank: int, text_encoders: Sequence[int] = (1, 2)) -> None:
    """Add trainable LoRA adapters (peft) to the text encoder(s) and/or the U-Net of `components`, in place.

    alpha = rank (scale 1, the authors' `network_alpha=None`), Gaussian init (std 1/r for A, zeros for B), targets
    `TE_TARGETS` / `UNET_TARGETS`. The LoRA tensors are fp32 and require grad whatever the base dtype (peft casts
    the layer input to fp32 for the LoRA branch and the sum back to the base dtype); the base stays frozen.
    `text_encoders`: which encoders `text_encoder` adapts, 1-based (SDXL: 1 = text_encoder, 2 = text_encoder_2; SD 1.x
    has only 1: a 2 is dropped there, [2] alone is an error). On SDXL text_encoder's last layer gets no LoRA: SDXL
    conditions on its penultimate hidden state, so that layer's output is never used (and would get no gradient).
    Adapters are added (and initialised from the global RNG) in `LORA_PARTS` order.
    """
    if not (text_encoder or unet):
        raise ValueError("add_lora: nothing to adapt; set text_encoder and/or unet to True")
    if rank < 1:
        raise ValueError(f"add_lora: rank must be >= 1, got {rank}")
    selected = list(text_encoders)
    if not selected or not set(selected) <= {1, 2}:
        raise ValueError(f"add_lora: text_encoders = {selected}: expected a non-empty selection of 1 and 2")
    parts = []
    if text_encoder:
        parts = [part for i, part in ((1, "text_encoder"), (2, "text_encoder_2"))
                 if i in selected and getattr(components, part, None) is not None]
        if not parts:
            raise ValueError(f"add_lora: text_encoders = {selected} but {_model_words(components)} has only text "
                             "encoder 1")
    if unet:
        parts.append("unet")
    for name in parts:
        model = getattr(components, name)
        if _lora_layers(model):
            raise ValueError(f"add_lora: the {name} already has a LoRA adapter named '{ADAPTER}'")
        layers = None
        if name == "text_encoder" and getattr(components, "is_sdxl", False):
            n_layers = model.config.num_hidden_layers
            if n_layers < 2:
                raise ValueError(f"add_lora: SDXL's text_encoder has {n_layers} layer; its LoRA goes on the layers "
                                 "before the last, whose output SDXL does not use")
            layers = range(n_layers - 1)
        model.requires_grad_(False)
        model.add_adapter(_lora_config(rank, UNET_TARGETS if name == "unet" else TE_TARGETS, layers),
                          adapter_name=ADAPTER)
        for _, layer in _lora_layers(model):
            for part in (layer.lora_A[ADAPTER], layer.lora_B[ADAPTER]):
                part.float().requires_grad_(True)


# ----------------------------------------------------------------------------------------------------------------
# Prefix soft tokens
# ----------------------------------------------------------------------------------------------------------------


class PrefixTokens(nn.Module):
    """fp32 embeddings `[n, D]` for the token ids `token_ids` `[n]`, spliced into the token-embedding output.

    Registered as a forward hook of the text encoder's token embedding (and kept as a plain attribute of it, so the
    text encoder's own state dict is unchanged). Create it after the components are on their final device.
    """

    def __init__(self, token_ids: Sequence[int], init: torch.Tensor):
        super().__init__()
        self.embeddings = nn.Parameter(init.detach().to(torch.float32).clone())
        self.register_buffer("token_ids", torch.tensor(list(token_ids), dtype=torch.long, device=init.device))
        self.enabled = True

    def splice(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        """Forward hook: `output` `[B, L, D]` with the rows of prefix ids replaced by `embeddings` (differentiable)."""
        if not self.enabled:
            return output
        ids = args[0]  # [B, L]
        match = ids.unsqueeze(-1) == self.token_ids.to(ids.device)  # [B, L, n]
        hit = match.any(-1)
        if not bool(hit.any()):
            return output
        if self.embeddings.device != output.device:
            raise RuntimeError(
                f"prefix embeddings are on {self.embeddings.device} but the text encoder runs on {output.device}: "
                "call add_prefix_tokens after moving the components to their device"
            )
        rows = self.embeddings.to(output.dtype)[match.to(torch.long).argmax(-1)]  # [B, L, D]
        return torch.where(hit.unsqueeze(-1), rows, output)


def _encoders(components) -> list[tuple[str, object, nn.Module]]:
    """(tokenizer attribute, tokenizer, text encoder) for each text encoder: text_encoder, then SDXL's text_encoder_2."""
    out = [("tokenizer", components.tokenizer, components.text_encoder)]
    if getattr(components, "text_encoder_2", None) is not None:
        out.append(("tokenizer_2", components.tokenizer_2, components.text_encoder_2))
    return out


def _prefixes(components) -> list[PrefixTokens | None]:
    """The prefix module of each text encoder (`_encoders` order), None where it has none."""
    return [getattr(te.get_input_embeddings(), "_fair_prefix", None) for _, _, te in _encoders(components)]


def add_prefix_tokens(components, n: int, seed: int) -> list[str]:
    """Add `<common-token1>`..`<common-token{n}>` to the tokenizer and make only their embeddings trainable (fp32).

    Each new row starts as a copy of an existing row chosen with `random.Random(seed)` (the authors used Python's
    `random`); the text encoder's table is resized and holds the initial copies, the trainable `[n, D]` parameter
    (`prefix.embeddings`) overrides them in the forward pass. Sets `components.prompt_prefix` to the joined tokens.
    SDXL: the tokens go into both tokenizers (SDXL needs the same tokens in both) and each gets a row in both encoders,
    copied from the same source rows; text_encoder_2's `[n, D2]` parameter is `prefix_2.embeddings`.
    """
    if n < 1:
        raise ValueError(f"add_prefix_tokens: n must be >= 1, got {n}")
    if any(p is not None for p in _prefixes(components)):
        raise ValueError("add_prefix_tokens: these components already have prefix tokens")
    encoders = _encoders(components)
    tokens = [PREFIX_TOKEN.format(i=i) for i in range(1, n + 1)]
    for attr, tok, _ in encoders:
        vocab = tok.get_vocab()
        clash = [t for t in tokens if t in vocab]
        if clash:
            raise ValueError(f"add_prefix_tokens: the {attr} already has token(s) {clash}")
    old = min(te.get_input_embeddings().weight.shape[0] for _, _, te in encoders)
    rng = random.Random(seed)
    sources = [rng.randrange(old) for _ in range(n)]
    for attr, tok, te in encoders:
        if tok.add_tokens(tokens) != n:
            raise RuntimeError(f"add_prefix_tokens: the {attr} did not add all of {tokens}")
        ids = tok.convert_tokens_to_ids(tokens)
        te.resize_token_embeddings(len(tok), mean_resizing=False)
        emb = te.get_input_embeddings()
        emb.weight.requires_grad_(False)
        with torch.no_grad():
            for i, src in zip(ids, sources):
                emb.weight[i] = emb.weight[src]
        prefix = PrefixTokens(ids, emb.weight[ids].detach())
        object.__setattr__(emb, "_fair_prefix", prefix)  # a plain attribute: not a registered submodule
        emb.register_forward_hook(prefix.splice)
    components.prompt_prefix = "".join(tokens)
    return tokens


# ----------------------------------------------------------------------------------------------------------------
# Trainable tensors
# ----------------------------------------------------------------------------------------------------------------


def trainable_parameters(components) -> dict[str, nn.Parameter]:
    """Every tensor the finetuning trains, by stable name, sorted: `text_encoder.<module>.lora_{A,B}.weight`,
    `text_encoder_2.<module>.lora_{A,B}.weight` (SDXL), `unet.<module>.lora_{A,B}.weight`, `prefix.embeddings`
    `[n, D]` and on SDXL `prefix_2.embeddings` `[n, D2]`."""
    out: dict[str, nn.Parameter] = {}
    for part, model in _lora_models(components):
        for name, layer in _lora_layers(model):
            out[f"{part}.{name}.lora_A.weight"] = layer.lora_A[ADAPTER].weight
            out[f"{part}.{name}.lora_B.weight"] = layer.lora_B[ADAPTER].weight
    for key, prefix in zip((PREFIX_KEY, PREFIX_KEY_2), _prefixes(components)):
        if prefix is not None:
            out[key] = prefix.embeddings
    return dict(sorted(out.items()))


def trainable_state_dict(components) -> dict[str, torch.Tensor]:
    """Detached CPU fp32 copies of `trainable_parameters` (what `trainable.safetensors` holds)."""
    return {k: p.detach().to("cpu", torch.float32, copy=True).contiguous() for k, p in
            trainable_parameters(components).items()}


def _check_state_dict(expected: dict[str, torch.Tensor], sd: dict[str, torch.Tensor], source: str) -> None:
    """Strict key and shape check of `sd` against `expected`; raises CheckpointError naming `source` and the key."""
    for k in sd:
        if k not in expected:
            close = difflib.get_close_matches(k, list(expected), n=1)
            hint = f" (closest expected key: '{close[0]}')" if close else ""
            raise CheckpointError(f"{source}: unexpected key '{k}'{hint}; expected {len(expected)} keys")
    missing = [k for k in expected if k not in sd]
    if missing:
        raise CheckpointError(f"{source}: missing key '{missing[0]}' ({len(missing)} of {len(expected)} missing)")
    for k, p in expected.items():
        v = sd[k]
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{source}: key '{k}' holds a {type(v).__name__}, expected a tensor")
        if tuple(v.shape) != tuple(p.shape):
            raise CheckpointError(f"{source}: key '{k}' has shape {list(v.shape)}, expected {list(p.shape)}")


def load_trainable_state_dict(components, sd: dict[str, torch.Tensor], source: str = "state dict") -> None:
    """Copy `sd` (from `trainable_state_dict`) into the trainable tensors. Strict: every key consumed, none missing,
    shapes equal; an error names `source` and the key."""
    params = trainable_parameters(components)
    if not params:
        raise CheckpointError(f"{source}: the components have no adapters to load into (call add_lora or "
                              "add_prefix_tokens first)")
    _check_state_dict(params, sd, source)
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(sd[k].to(p.device, p.dtype))


def _lora_enabled(model: nn.Module) -> bool | None:
    """True/False if `model` has peft adapters (enabled or not), None if it has none."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for m in model.modules():
        if isinstance(m, BaseTunerLayer):
            return not m.disable_adapters
    return None


@contextlib.contextmanager
def adapters_disabled(components) -> Iterator[None]:
    """Inside, `components` behave as the ORIGINAL model: every LoRA adapter off, prefix splicing off and
    `prompt_prefix` = ""; everything is restored on exit (nesting is fine)."""
    turned_off = []
    for _, model in _lora_models(components):
        if _lora_enabled(model):
            model.disable_adapters()
            turned_off.append(model)
    prefixes = [p for p in _prefixes(components) if p is not None]
    was_enabled = [p.enabled for p in prefixes]
    saved_prefix = components.prompt_prefix
    for prefix in prefixes:
        prefix.enabled = False
    components.prompt_prefix = ""
    try:
        yield
    finally:
        for model in turned_off:
            model.enable_adapters()
        for prefix, enabled in zip(prefixes, was_enabled):
            prefix.enabled = enabled
        components.prompt_prefix = saved_prefix


# ----------------------------------------------------------------------------------------------------------------
# EMA
# ----------------------------------------------------------------------------------------------------------------


class EMA:
    """Exponential moving average of named parameters, as diffusers 0.19.3 `EMAModel` with the authors' settings.

    With s = optimization_step - 1 (the step counter after the increment), the decay is 0 for s <= 0 (the first
    update copies the parameters) and min((1 + s) / (10 + s), decay) after; update: shadow <- shadow - (1 - d)(shadow - p).
    The shadow is fp32 and lives on the parameters' devices.
    """

    def __init__(self, params: dict[str, nn.Parameter], decay: float = 0.996):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.params = dict(params)
        self.decay = float(decay)
        self.optimization_step = 0
        self.shadow: dict[str, torch.Tensor] = {k: p.detach().to(torch.float32).clone() for k, p in self.params.items()}

    def current_decay(self) -> float:
        """Decay applied by the update that brought the counter to `optimization_step`."""
        s = self.optimization_step - 1
        return 0.0 if s <= 0 else min((1.0 + s) / (10.0 + s), self.decay)

    @torch.no_grad()
    def step(self) -> float:
        """One EMA update from the current parameters; returns the decay used."""
        self.optimization_step += 1
        d = self.current_decay()
        for k, p in self.params.items():
            sh = self.shadow[k]
            sh.sub_((1.0 - d) * (sh - p.detach().to(sh.dtype)))
        return d

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """Inside, the parameters hold the EMA weights; their own values are restored on exit."""
        with torch.no_grad():
            backup = {k: p.detach().clone() for k, p in self.params.items()}
            for k, p in self.params.items():
                p.copy_(self.shadow[k].to(p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for k, p in self.params.items():
                    p.copy_(backup[k])

    def state_dict(self) -> dict:
        """{"decay", "optimization_step", "shadow": {name: CPU fp32 tensor}}."""
        return {"decay": self.decay, "optimization_step": self.optimization_step,
                "shadow": {k: v.detach().cpu().clone() for k, v in self.shadow.items()}}

    def load_state_dict(self, state: dict, source: str = "EMA state") -> None:
        """Strict inverse of `state_dict` (shadow keys and shapes must match the tracked parameters)."""
        for key in ("decay", "optimization_step", "shadow"):
            if key not in state:
                raise CheckpointError(f"{source}: missing key '{key}'")
        _check_state_dict(self.shadow, state["shadow"], f"{source} (shadow)")
        self.decay = float(state["decay"])
        self.optimization_step = int(state["optimization_step"])
        for k, v in state["shadow"].items():
            self.shadow[k].copy_(v.to(self.shadow[k].device, torch.float32))


# ----------------------------------------------------------------------------------------------------------------
# Diffusers LoRA / textual-inversion files
# ----------------------------------------------------------------------------------------------------------------


def save_lora(components, out_dir: str | Path, metadata: dict | None = None) -> Path:
    """Write the adapters of `components` in the interchange formats; returns the main file (or the folder).

    LoRA: `out_dir/pytorch_lora_weights.safetensors` through `StableDiffusionPipeline.save_lora_weights` (SDXL:
    `StableDiffusionXLPipeline.save_lora_weights`, with text_encoder_2's layers), with each model's peft config as
    adapter metadata (so alpha and the adapted layers round-trip). Prefix tokens: `learned_embeds-{i}.safetensors`,
    one per token ({token: Tensor[D]}, diffusers' textual-inversion format); SDXL: one `SDXL_TI_FILE` with both
    encoders' rows. `metadata` (JSON-able: base model, attributes, steps, ...) goes to `adapter_info.json` together
    with what was written; SDXL exports also record `"model_type": "SDXL"` there (absent: an SD 1.x export).
    """
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    sdxl = model_kind(components) == "SDXL"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    info: dict = {"metadata": metadata or {}}
    if sdxl:
        info["model_type"] = "SDXL"
    main: Path | None = None
    layers, meta = {}, {}
    for part, model in _lora_models(components):
        if _lora_layers(model):
            sd = get_peft_model_state_dict(model, adapter_name=ADAPTER)
            cfg = model.peft_config[ADAPTER]
            layers[part] = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in sd.items()}
            meta[part] = cfg.to_dict()
            info[part] = {"rank": cfg.r, "alpha": cfg.lora_alpha, "targets": sorted(cfg.target_modules),
                          "tensors": len(sd)}
            if cfg.layers_to_transform is not None:
                info[part]["layers"] = list(cfg.layers_to_transform)
    if layers:
        kw = dict(unet_lora_layers=layers.get("unet"), text_encoder_lora_layers=layers.get("text_encoder"),
                  unet_lora_adapter_metadata=meta.get("unet"),
                  text_encoder_lora_adapter_metadata=meta.get("text_encoder"))
        if sdxl:
            StableDiffusionXLPipeline.save_lora_weights(
                out, **kw, text_encoder_2_lora_layers=layers.get("text_encoder_2"),
                text_encoder_2_lora_adapter_metadata=meta.get("text_encoder_2"))
        else:
            StableDiffusionPipeline.save_lora_weights(out, **kw)
        main = out / LORA_FILE
    prefixes = _prefixes(components)
    if prefixes[0] is not None:
        tokens = components.tokenizer.convert_ids_to_tokens(prefixes[0].token_ids.tolist())
        rows = [p.embeddings.detach().to("cpu", torch.float32) for p in prefixes if p is not None]
        if sdxl:
            if len(rows) != 2:
                raise ValueError("save_lora: SDXL prefix tokens need a row in both text encoders; text_encoder_2 has "
                                 "none (use add_prefix_tokens)")
            save_file({key: r.clone().contiguous() for key, r in zip(SDXL_TI_KEYS, rows)}, str(out / SDXL_TI_FILE),
                      metadata={"tokens": json.dumps(tokens)})
            files = [SDXL_TI_FILE]
        else:
            files = _write_token_files(out, tokens, rows[0])
        info["prefix"] = {"tokens": tokens, "files": files, "prompt_prefix": "".join(tokens)}
    return _finish_export(out, info, main or (out if prefixes[0] is not None else None), "save_lora: the components "
                          "have no adapters to save")


def _write_token_files(out: Path, tokens: list[str], rows) -> list[str]:
    """One `learned_embeds-{i}.safetensors` per prefix token ({token: row}), the layout SD 1.x textual inversion
    loading reads; returns the file names."""
    from safetensors.torch import save_file

    files = []
    for i, (token, row) in enumerate(zip(tokens, rows), start=1):
        f = out / TI_FILE.format(i=i)
        save_file({token: row.clone().contiguous()}, str(f))
        files.append(f.name)
    return files


def _finish_export(out: Path, info: dict, main: Path | None, nothing: str) -> Path:
    """Write adapter_info.json beside the exported files; `nothing` is the error when no file was written."""
    if main is None:
        raise ValueError(nothing)
    (out / INFO_FILE).write_text(json.dumps(info, indent=2, default=str))
    return main


def _ti_files(folder: Path) -> list[Path]:
    files = [p for p in folder.glob("learned_embeds-*.safetensors") if re.fullmatch(r"learned_embeds-\d+", p.stem)]
    return sorted(files, key=lambda p: int(p.stem.split("-")[1]))


def _export_info(folder: Path) -> dict:
    """The `adapter_info.json` of an export folder ({} when there is none)."""
    f = folder / INFO_FILE
    if not f.is_file():
        return {}
    try:
        info = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{f}: not valid JSON ({e}); expected the adapter_info.json written by save_lora") from None
    if not isinstance(info, dict):
        raise CheckpointError(f"{f}: expected a JSON object (as save_lora writes), got {type(info).__name__}")
    return info


def _check_export_fits(components, source: Path, export_sdxl: bool, info: dict) -> None:
    """Refuse an SDXL export for SD 1.x components and the reverse, naming both models (shapes alone cannot tell: SD
    1.5's text encoder has the shape of SDXL's first). `info`: the export's adapter_info.json (for its base model)."""
    if export_sdxl == (model_kind(components) == "SDXL"):
        return
    kind = "SDXL" if export_sdxl else "SD 1.x"
    base = (info.get("metadata") or {}).get("base_model") if isinstance(info.get("metadata"), dict) else None
    made = f"the {kind} model '{base}'" if base else f"an {kind} model"
    raise CheckpointError(f"{source}: this adapter was exported from {made} and cannot be loaded into "
                          f"{_model_words(components)}")


def check_released_target(components, source: str | Path) -> None:
    """The authors' released files are SD 1.5 adapters: refuse SDXL components with one sentence naming both."""
    if model_kind(components) == "SDXL":
        raise CheckpointError(f"{source}: the authors' released checkpoints are SD 1.5 adapters and cannot be loaded "
                              f"into {_model_words(components)}")


_LORA_KEY = re.compile(r"(text_encoder_2|text_encoder|unet)\.(.+)\.lora_([AB])\.weight")


def _check_lora_shapes(components, lora_file: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    """Each `part.<module>.lora_A|B.weight` key of a LoRA file names a Linear of that part of `components` with its
    input (A) or output (B) size, so a file of another base model fails here with one sentence, not inside diffusers'
    loader. Keys in other spellings are left to diffusers' converters (the loaded-tensor count still checks them)."""
    for key, shape in sorted(shapes.items()):
        m = _LORA_KEY.fullmatch(key)
        if m is None:
            continue
        part, module, which = m.groups()
        model = getattr(components, part, None)
        if model is None:
            raise CheckpointError(f"{lora_file}: key '{key}' is for a {part}, which {_model_words(components)} "
                                  "does not have")
        if part != "unet" and not hasattr(model, "text_model"):  # transformers' flattened CLIPTextModel, as diffusers
            module = module.removeprefix("text_model.")
        try:
            layer = model.get_submodule(module)
        except AttributeError:
            layer = None
        base = getattr(layer, "base_layer", layer)
        if not isinstance(base, nn.Linear):
            raise CheckpointError(f"{lora_file}: key '{key}' names no linear layer in the {part} of "
                                  f"{_model_words(components)}; the file was made for another base model")
        want = (shape[0], base.in_features) if which == "A" else (base.out_features, shape[-1])
        if len(shape) != 2 or tuple(shape) != want:
            raise CheckpointError(f"{lora_file}: key '{key}' has shape {list(shape)} but the {part} of "
                                  f"{_model_words(components)} needs {list(want)}; the file was made for another "
                                  "base model")


def _load_sdxl_prefix(components, f: Path) -> list[str]:
    """An `SDXL_TI_FILE` into SDXL components, through diffusers' `load_textual_inversion` once per encoder (clip_l
    into text_encoder, clip_g into text_encoder_2, the same tokens in both tokenizers). Returns the tokens."""
    from safetensors import safe_open

    from common.models import diffusers_pipeline

    with safe_open(str(f), "pt") as fh:
        tokens_json = (fh.metadata() or {}).get("tokens")
        sd = {k: fh.get_tensor(k) for k in fh.keys()}
    try:
        tokens = json.loads(tokens_json) if tokens_json is not None else None
    except json.JSONDecodeError:
        tokens = None
    if not (isinstance(tokens, list) and tokens and all(isinstance(t, str) for t in tokens)):
        raise CheckpointError(f"{f}: the file's metadata 'tokens' should be a JSON list of the token names (as save_lora "
                              f"writes), got {tokens_json!r}")
    encoders = _encoders(components)
    for key, (_, _, te) in zip(SDXL_TI_KEYS, encoders):
        want = (len(tokens), te.get_input_embeddings().weight.shape[1])
        if tuple(sd[key].shape) != want:
            raise CheckpointError(f"{f}: key '{key}' has shape {list(sd[key].shape)}, expected {list(want)} (one row "
                                  f"per token of the metadata, as wide as the text encoder's embeddings)")
    pipe = diffusers_pipeline(components)
    for key, (_, tok, te) in zip(SDXL_TI_KEYS, encoders):
        pipe.load_textual_inversion(sd[key], token=list(tokens), tokenizer=tok, text_encoder=te)
    components.prompt_prefix = "".join(tokens)
    return tokens


def load_textual_inversion(components, path: str | Path) -> list[str]:
    """Load prefix-token embeddings written by `save_lora` (a folder of `learned_embeds-{i}.safetensors`, or one such
    file; SDXL: the folder's `SDXL_TI_FILE` or that file) into `components` through diffusers' `load_textual_inversion`
    (adds the tokens, resizes the embedding tables); sets `components.prompt_prefix` to the tokens in file order.
    An SDXL file for SD 1.x components, or the reverse, is refused naming both models. Returns the tokens."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from common.models import diffusers_pipeline

    path = Path(path)
    if path.is_dir():
        files = _ti_files(path) or ([path / SDXL_TI_FILE] if (path / SDXL_TI_FILE).is_file() else [])
    else:
        files = [path]
    if not files or not all(f.is_file() for f in files):
        raise FileNotFoundError(f"{path}: no textual-inversion file (expected learned_embeds-1.safetensors, ... or "
                                f"{SDXL_TI_FILE})")
    with safe_open(str(files[0]), "pt") as fh:
        sdxl = set(fh.keys()) == set(SDXL_TI_KEYS)
    _check_export_fits(components, files[0], sdxl, _export_info(path if path.is_dir() else path.parent))
    if sdxl:
        return _load_sdxl_prefix(components, files[0])
    tokens = []
    for f in files:
        sd = load_file(str(f))
        if len(sd) != 1:
            raise CheckpointError(f"{f}: expected one key (the token) in a textual-inversion file, got {list(sd)}")
        (token, vec), = sd.items()
        dim = components.text_encoder.get_input_embeddings().weight.shape[1]
        if vec.shape != (dim,):
            raise CheckpointError(f"{f}: key '{token}' has shape {list(vec.shape)}, expected [{dim}]")
        tokens.append(token)
    diffusers_pipeline(components).load_textual_inversion([str(f) for f in files])
    components.prompt_prefix = "".join(tokens)
    return tokens


def _adapter_pairs(model: nn.Module) -> set[tuple[str, str]]:
    """(module name, adapter name) for every adapter of every peft LoRA layer of `model`."""
    from peft.tuners.lora import LoraLayer

    return {(n, a) for n, m in model.named_modules() if isinstance(m, LoraLayer) for a in m.lora_A}


def load_lora(components, path: str | Path) -> dict:
    """Load an exported adapter into `components` in place (what `generate --lora PATH` uses); returns a summary.

    `path`: a folder or file written by `save_lora` (diffusers LoRA and/or textual-inversion files), or the authors'
    released `.pth` files / their folder (then `load_released`). LoRA goes through diffusers' `load_lora_weights` on a
    pipeline sharing the modules (SDXL: `StableDiffusionXLPipeline`'s, text_encoder_2 included); every tensor of the
    file must land in the model (checked), and the loaded LoRA tensors are cast to fp32, as in training. Before
    anything is loaded: an SDXL export (adapter_info.json's `model_type`, or text_encoder_2 keys) for SD 1.x
    components or the reverse is refused naming both models, and every key's module and shape are checked.
    """
    from safetensors import safe_open

    from common.models import diffusers_pipeline

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: adapter path not found")
    released = [n for names in RELEASED_FILES.values() for n in names]
    if path.is_file():
        if path.suffix == ".pth":
            check_released_target(components, path)
            return load_released([str(path)], components)
        is_ti = re.fullmatch(r"learned_embeds-\d+", path.stem) is not None or path.name == SDXL_TI_FILE
        lora_file, ti = (None, [path]) if is_ti else (path, [])
    else:
        lora_file = path / LORA_FILE if (path / LORA_FILE).is_file() else None
        ti = _ti_files(path) or ([path / SDXL_TI_FILE] if (path / SDXL_TI_FILE).is_file() else [])
        if lora_file is None and not ti and any((path / n).is_file() for n in released):
            check_released_target(components, path)
            return load_released([str(path)], components)
    if lora_file is None and not ti:
        raise FileNotFoundError(f"{path}: no adapter found (expected {LORA_FILE}, learned_embeds-1.safetensors, ..., "
                                f"{SDXL_TI_FILE} or the released {', '.join(released)})")
    summary: dict = {"path": str(path)}
    if lora_file is not None:
        with safe_open(str(lora_file), "pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        odd = [k for k in shapes if not k.startswith(tuple(f"{part}." for part in LORA_PARTS))]
        if odd:
            raise CheckpointError(f"{lora_file}: key '{odd[0]}' belongs to none of 'text_encoder.', 'text_encoder_2.' "
                                  "and 'unet.'")
        info = _export_info(lora_file.parent)
        sdxl = info.get("model_type") == "SDXL" or any(k.startswith("text_encoder_2.") for k in shapes)
        if info or sdxl:  # a file without adapter_info.json (not ours) is judged by its keys and shapes alone
            _check_export_fits(components, lora_file, sdxl, info)
        _check_lora_shapes(components, lora_file, shapes)
        counts = {part: sum(k.startswith(part + ".") for k in shapes) for part, _ in _lora_models(components)}
        before = {part: _adapter_pairs(getattr(components, part)) for part in counts}
        diffusers_pipeline(components).load_lora_weights(str(lora_file.parent), weight_name=lora_file.name)
        for part, n in counts.items():
            model = getattr(components, part)
            new = _adapter_pairs(model) - before[part]
            if 2 * len(new) != n:
                raise CheckpointError(f"{lora_file}: {n} '{part}.' tensors in the file but {2 * len(new)} were loaded "
                                      f"into the {part}; the file does not fit this model")
            for name, adapter in new:
                layer = model.get_submodule(name)
                layer.lora_A[adapter].float()
                layer.lora_B[adapter].float()
        summary["lora_tensors"] = counts
    if ti:
        summary["prefix_tokens"] = load_textual_inversion(components, path if path.is_dir() else ti[0])
    return summary


# ----------------------------------------------------------------------------------------------------------------
# The authors' released .pth files (docs/method.md#released-checkpoint-format)
# ----------------------------------------------------------------------------------------------------------------

_TE_MODULE = re.compile(r"(?:text_model\.)?encoder\.layers\.(\d+)\.(self_attn\.(?:q|k|v|out)_proj|mlp\.fc[12])")
_TE_ORDER = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")
_UNET_ATTN = re.compile(r"(?:down_blocks\.\d+|up_blocks\.\d+|mid_block)\.attentions\.\d+\.transformer_blocks\.\d+\.attn[12]")
_UNET_PROJ = (("to_q", "to_q_lora"), ("to_k", "to_k_lora"), ("to_v", "to_v_lora"), ("to_out.0", "to_out_lora"))
_PREFIX_KEYS = ("position_ids", "position_embedding.weight", "token_embedding.weight")
_RELEASED_KEY = {
    "text_encoder": re.compile(r"text_model\.encoder\.layers\.(\d+)\.(self_attn\.(?:q|k|v|out)_proj|mlp\.fc[12])"
                               r"\.lora_linear_layer\.(down|up)\.weight"),
    "unet": re.compile(r"(((?:down|up)_blocks\.\d+|mid_block)\.attentions\.(\d+)\.transformer_blocks\.(\d+)\.attn[12])"
                       r"\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight"),
}
_KEY_FORM = {
    "text_encoder": "'text_model.encoder.layers.{i}.{self_attn.q_proj|self_attn.k_proj|self_attn.v_proj|"
                    "self_attn.out_proj|mlp.fc1|mlp.fc2}.lora_linear_layer.{down|up}.weight'",
    "unet": "'{down_blocks.N|mid_block|up_blocks.N}.attentions.{a}.transformer_blocks.{t}.{attn1|attn2}.processor."
            "{to_q|to_k|to_v|to_out}_lora.{down|up}.weight'",
    "prefix": "'position_ids', 'position_embedding.weight' and 'token_embedding.weight'",
}
_PART_WORDS = {"text_encoder": "text-encoder LoRA", "unet": "U-Net LoRA", "prefix": "prefix-embedding"}
_PROJ_DIMS = {"self_attn.q_proj": ("h", "h"), "self_attn.k_proj": ("h", "h"), "self_attn.v_proj": ("h", "h"),
              "self_attn.out_proj": ("h", "h"), "mlp.fc1": ("h", "m"), "mlp.fc2": ("m", "h"),
              "to_q": ("h", "h"), "to_k": ("c", "h"), "to_v": ("c", "h"), "to_out": ("h", "h")}
"""(input, output) size of each adapted projection as a symbol all of a file's (text encoder) or a processor's
(U-Net) tensors must agree on: h hidden / query width, m CLIP MLP width, c key-value (context) width"""


def _dims(m: nn.Module) -> tuple[int, int]:
    base = getattr(m, "base_layer", m)
    return base.in_features, base.out_features


def _released_entries(model: nn.Module) -> dict[str, tuple[str, str, int, int]]:
    """Released key -> (our module name, "A" | "B", in_features, out_features), built from `model`'s own modules
    (a CLIP text model or a U-Net, adapted or not), in the authors' order (docs/method.md#released-checkpoint-format)."""
    out: dict[str, tuple[str, str, int, int]] = {}
    te = []
    for name, m in model.named_modules():
        mt = _TE_MODULE.fullmatch(name)
        if mt:
            te.append((mt.group(2).startswith("mlp"), int(mt.group(1)), _TE_ORDER.index(mt.group(2)), name, m))
    for *_, name, m in sorted(te, key=lambda t: t[:3]):
        i, o = _dims(m)
        local = name.removeprefix("text_model.")
        out[f"text_model.{local}.lora_linear_layer.down.weight"] = (name, "A", i, o)
        out[f"text_model.{local}.lora_linear_layer.up.weight"] = (name, "B", i, o)
    for name, m in model.named_modules():
        if _UNET_ATTN.fullmatch(name):
            for proj, rel in _UNET_PROJ:
                i, o = _dims(m.get_submodule(proj))
                out[f"{name}.processor.{rel}.down.weight"] = (f"{name}.{proj}", "A", i, o)
                out[f"{name}.processor.{rel}.up.weight"] = (f"{name}.{proj}", "B", i, o)
    return out


def released_layout(model: nn.Module, rank: int) -> dict[str, tuple[int, ...]]:
    """The keys and shapes of the authors' `text_encoder_lora*.pth` (for a CLIP text model) or `unet_lora*.pth` (for
    a U-Net) at LoRA rank `rank`, derived from the model's modules: down `[r, in]`, up `[out, r]`. Works on the meta
    device (SD 1.5: 144 text-encoder tensors, 256 U-Net tensors)."""
    return {k: ((rank, i) if w == "A" else (o, rank)) for k, (_, w, i, o) in _released_entries(model).items()}


def _read_released(path: Path) -> dict[str, torch.Tensor]:
    """torch.load(weights_only=True) of a released file, which must be a flat dict[str, Tensor]."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any unpickling failure (truncated zip, bad pickle, ...) is reported the same way
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(f"{path}: cannot be read as a weights-only torch.save file ({type(e).__name__}: {msg}); "
                              "it may be truncated or corrupt") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors (torch.save of a state dict), got {type(obj).__name__}")
    for k, v in obj.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{path}: key {k!r} holds a {type(v).__name__}; expected str keys and tensor values")
    return obj


def _unknown_key(path: Path, part: str, key: str) -> CheckpointError:
    """The error for a key that a released `part` file cannot hold; DDP (`module.`), unrenamed `AttnProcsLayers`
    (`layers.N`) and another part's keys (a misnamed file) are named as such."""
    form = _KEY_FORM[part]
    if key.startswith("module."):
        return CheckpointError(f"{path}: key '{key}' carries a 'module.' prefix (saved from a DDP-wrapped model); "
                               f"expected the documented names {form}")
    if re.match(r"layers\.\d+\.", key):
        return CheckpointError(f"{path}: key '{key}' is an unrenamed AttnProcsLayers index ('layers.N'); expected "
                               f"the documented names {form}")
    other = next((p for p, rx in _RELEASED_KEY.items() if p != part and rx.fullmatch(key)), None)
    other = other or ("prefix" if part != "prefix" and key in _PREFIX_KEYS else None)
    hint = f" (a key of the {_PART_WORDS[other]} file: is this file misnamed?)" if other else ""
    return CheckpointError(f"{path}: unknown key '{key}'{hint}; a released {_PART_WORDS[part]} file holds only "
                           f"keys {form}")


def _expected_lora_keys(part: str, found: Sequence[re.Match]) -> list[str]:
    """Every key a complete file covering the layers (text encoder) or blocks (U-Net) of `found` holds, in the authors'
    order (docs/method.md#released-checkpoint-format): without a model, completeness can only be judged within what
    the file covers."""
    if part == "text_encoder":
        n = max(int(m[1]) for m in found) + 1
        return [f"text_model.encoder.layers.{i}.{mod}.lora_linear_layer.{d}.weight" for mlp in (False, True)
                for i in range(n) for mod in _TE_ORDER if mod.startswith("mlp.") == mlp for d in ("down", "up")]
    extent: dict[str, list[int]] = {}  # block -> [attentions, transformer blocks]
    for m in found:
        a, t = extent.setdefault(m[2], [0, 0])
        extent[m[2]] = [max(a, int(m[3]) + 1), max(t, int(m[4]) + 1)]
    kind = {"down_blocks": 0, "up_blocks": 1, "mid_block": 2}  # the authors' processor order
    blocks = sorted(extent, key=lambda b: (kind[b.split(".")[0]], b))
    return [f"{b}.attentions.{a}.transformer_blocks.{t}.{attn}.processor.{proj}_lora.{d}.weight" for b in blocks
            for a in range(extent[b][0]) for t in range(extent[b][1]) for attn in ("attn1", "attn2")
            for proj in ("to_q", "to_k", "to_v", "to_out") for d in ("down", "up")]


def _check_lora_file(path: Path, part: str, sd: dict[str, torch.Tensor]) -> tuple[int, dict[str, torch.Tensor]]:
    """Check a released LoRA file from its own keys and shapes (no model): known keys only, complete within what it
    covers, one rank, and the sizes of every projection consistent. Returns (rank, {key: fp32 tensor}) in the
    authors' key order."""
    if not sd:
        raise CheckpointError(f"{path}: holds no tensors; expected the released {_PART_WORDS[part]} keys "
                              f"{_KEY_FORM[part]}")
    found = {}
    for k, v in sd.items():
        m = _RELEASED_KEY[part].fullmatch(k)
        if m is None:
            raise _unknown_key(path, part, k)
        if v.ndim != 2:
            raise CheckpointError(f"{path}: key '{k}' has shape {list(v.shape)}, expected a matrix")
        found[k] = m
    expected = _expected_lora_keys(part, list(found.values()))
    missing = [k for k in expected if k not in sd]
    if missing:
        raise CheckpointError(f"{path}: missing key '{missing[0]}' ({len(missing)} of the {len(expected)} keys that "
                              f"the layers in this file need are missing)")
    ranks = {k: v.shape[0] if found[k].groups()[-1] == "down" else v.shape[1] for k, v in sd.items()}
    rank, n = Counter(ranks.values()).most_common(1)[0]
    odd = next((k for k, r in ranks.items() if r != rank), None)
    if odd is not None:
        raise CheckpointError(f"{path}: key '{odd}' has rank {ranks[odd]} (shape {list(sd[odd].shape)}) but {n} of the "
                              f"file's {len(sd)} tensors have rank {rank}; mixed ranks in one file cannot be converted")
    votes: dict[tuple[str, str], Counter] = defaultdict(Counter)  # (scope, size symbol) -> sizes seen
    symbol = {}
    for k, m in found.items():
        scope, proj, which = ("", m[2], m[3]) if part == "text_encoder" else (m[1], m[5], m[6])
        fin, fout = _PROJ_DIMS[proj]
        symbol[k] = (scope, fin) if which == "down" else (scope, fout)
        votes[symbol[k]][sd[k].shape[1] if which == "down" else sd[k].shape[0]] += 1
    for k in expected:
        size = votes[symbol[k]].most_common(1)[0][0]
        want = (rank, size) if found[k].groups()[-1] == "down" else (size, rank)
        if tuple(sd[k].shape) != want:
            raise CheckpointError(f"{path}: key '{k}' has shape {list(sd[k].shape)}, expected {list(want)} (the sizes "
                                  "the file's other tensors agree on)")
    return rank, {k: sd[k].to(torch.float32) for k in expected}


def _check_prefix_file(path: Path, sd: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Check a released prefix file from its own keys and shapes (no model); returns (prefix rows `[n, D]`, the
    file's position table `[P, D]`), fp32."""
    for k in sd:
        if k not in _PREFIX_KEYS:
            raise _unknown_key(path, "prefix", k)
    missing = [k for k in _PREFIX_KEYS if k not in sd]
    if missing:
        raise CheckpointError(f"{path}: missing key '{missing[0]}'; a released prefix-embedding file holds "
                              f"{_KEY_FORM['prefix']}")
    pos, pe, tok = (sd[k] for k in _PREFIX_KEYS)
    if pe.ndim != 2:
        raise CheckpointError(f"{path}: key 'position_embedding.weight' has shape {list(pe.shape)}, expected a "
                              "[positions, width] table")
    n_pos, dim = pe.shape
    if tuple(pos.shape) != (1, n_pos) or not torch.equal(pos.long(), torch.arange(n_pos)[None]):
        raise CheckpointError(f"{path}: key 'position_ids' should be arange({n_pos}) of shape [1, {n_pos}] (one id per "
                              f"row of 'position_embedding.weight'), got shape {list(pos.shape)}")
    if tok.ndim != 2 or tok.shape[0] < 2 or tok.shape[1] != dim:
        raise CheckpointError(f"{path}: key 'token_embedding.weight' has shape {list(tok.shape)}, expected [n + 1, "
                              f"{dim}] (row 0 unused, rows 1..n the prefix tokens, as wide as the position table)")
    return tok[1:].to(torch.float32), pe.to(torch.float32)


@functools.cache
def _clip_layers_prefix() -> str:
    """Where the installed transformers' CLIPTextModel keeps `encoder.layers` ("" or "text_model."): the module path
    the diffusers file must name (read from a one-layer model built on the meta device, no weights)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        model = CLIPTextModel(CLIPTextConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                             num_attention_heads=1, max_position_embeddings=8, bos_token_id=0,
                                             eos_token_id=1, pad_token_id=1))
    name = next(n for n, _ in model.named_modules() if n.endswith("encoder.layers.0"))
    return name.removesuffix("encoder.layers.0")


def _released_module(part: str, key: str) -> tuple[str, str]:
    """A checked released key -> (module name in the transformers / diffusers model, "A" | "B"), per
    docs/method.md#released-checkpoint-format."""
    m = _RELEASED_KEY[part].fullmatch(key)
    if part == "text_encoder":
        return f"{_clip_layers_prefix()}encoder.layers.{m[1]}.{m[2]}", "A" if m[3] == "down" else "B"
    proj = "to_out.0" if m[5] == "to_out" else m[5]
    return f"{m[1]}.{proj}", "A" if m[6] == "down" else "B"


def find_released(paths: Sequence[str | Path], ema: bool) -> dict[str, Path]:
    """Which released file holds each part ("text_encoder", "unet", "prefix"): folders are searched for the EMA names
    first (the current-weight names first when `ema` is False); files must carry one of the released names."""
    found: dict[str, Path] = {}
    every = [n for names in RELEASED_FILES.values() for n in names]
    for p in map(Path, paths):
        hits: dict[str, Path] = {}
        if p.is_dir():
            for part, names in RELEASED_FILES.items():
                for name in names if ema else names[::-1]:
                    if (p / name).is_file():
                        hits[part] = p / name
                        break
            if not hits:
                raise FileNotFoundError(f"{p}: none of the released checkpoint files ({', '.join(every)}) is here")
        elif p.is_file():
            part = next((part for part, names in RELEASED_FILES.items() if p.name in names), None)
            if part is None:
                raise CheckpointError(f"{p}: not a released checkpoint file name; expected one of {', '.join(every)}")
            hits[part] = p
        else:
            raise FileNotFoundError(f"{p}: no such file or folder")
        for part, f in hits.items():
            if part in found:
                raise CheckpointError(f"two {part} files given: {found[part]} and {f}; pass one")
            found[part] = f
    return found


def _text_embeddings(te: nn.Module) -> nn.Module:
    return getattr(te, "text_model", te).embeddings


@dataclass
class Released:
    """The authors' released files, read and checked from their own keys and shapes (`read_released`)."""

    files: dict[str, Path]
    """part ("text_encoder", "unet", "prefix") -> the file read"""
    lora: dict[str, dict[str, torch.Tensor]]
    """LoRA part -> {released key: fp32 tensor}, in the authors' key order"""
    ranks: dict[str, int]
    """LoRA part -> its rank, inferred from that file's shapes"""
    tensors: dict[str, int]
    """part -> number of tensors in its file"""
    prefix_rows: torch.Tensor | None = None
    """fp32 `[n, D]`: rows 1..n of `token_embedding.weight` (the prefix tokens), None without a prefix file"""
    positions: torch.Tensor | None = None
    """fp32 `[P, D]`: the file's copy of the base model's position table (checked against a model when given)"""

    def summary(self) -> dict:
        """{"rank": the rank shared by every LoRA file (None without LoRA or when the files differ), "ranks": {part:
        rank}, "files": {part: path}, "tensors": {part: count}, "prefix_tokens": [...]}."""
        n = 0 if self.prefix_rows is None else self.prefix_rows.shape[0]
        return {"rank": next(iter(self.ranks.values())) if len(set(self.ranks.values())) == 1 else None,
                "ranks": dict(self.ranks), "files": {k: str(v) for k, v in self.files.items()}, "tensors": dict(self.tensors),
                "prefix_tokens": [PREFIX_TOKEN.format(i=i) for i in range(1, n + 1)]}


def read_released(paths: Sequence[str | Path], ema: bool = True) -> Released:
    """Read the authors' released files (see `find_released` for `paths` and `ema`) and check them from their own
    keys and shapes, with no base model: files read with `weights_only=True`; only documented keys; complete within
    the layers / blocks a file covers; one LoRA rank per file (inferred; mixed ranks in a file are an error);
    consistent projection sizes; each problem is an error naming the file and the key."""
    files = find_released(paths, ema)
    rel = Released(files=files, lora={}, ranks={}, tensors={})
    for part, f in files.items():
        sd = _read_released(f)
        rel.tensors[part] = len(sd)
        if part == "prefix":
            rel.prefix_rows, rel.positions = _check_prefix_file(f, sd)
        else:
            rel.ranks[part], rel.lora[part] = _check_lora_file(f, part, sd)
    return rel


def check_released(rel: Released, components) -> dict[str, dict[str, tuple[str, str]]]:
    """Check `rel` against a base model (`components`, unchanged): every LoRA key has its module and every module its
    key, shapes equal the model's at the file's rank, and the prefix file's position table is the model's. Errors
    name the file, the key, both shapes and the model. Returns {part: {released key: (module name, "A" | "B")}}."""
    name = f"model '{components.name}'" if getattr(components, "name", "") else "the base model"
    out: dict[str, dict[str, tuple[str, str]]] = {}
    for part, sd in rel.lora.items():
        f = rel.files[part]
        entries = {k: v for k, v in _released_entries(getattr(components, part)).items()
                   if (".processor." in k if part == "unet" else ".lora_linear_layer." in k)}
        extra = [k for k in sd if k not in entries]
        if extra:
            raise CheckpointError(f"{f}: key '{extra[0]}' has no module in {name} ({len(extra)} of the file's "
                                  f"{len(sd)} keys have none); the file was made for another base model")
        missing = [k for k in entries if k not in sd]
        if missing:
            raise CheckpointError(f"{f}: missing key '{missing[0]}' ({len(missing)} of the {len(entries)} keys that "
                                  f"{name} needs are missing)")
        rank = rel.ranks[part]
        for k, (_, which, i, o) in entries.items():
            want = (rank, i) if which == "A" else (o, rank)
            if tuple(sd[k].shape) != want:
                raise CheckpointError(f"{f}: key '{k}' has shape {list(sd[k].shape)} but {name} needs "
                                      f"{list(want)} at rank {rank}")
        out[part] = {k: (module, which) for k, (module, which, _, _) in entries.items()}
    if rel.prefix_rows is not None:
        f = rel.files["prefix"]
        emb = _text_embeddings(components.text_encoder)
        table = emb.position_embedding.weight
        if tuple(rel.positions.shape) != tuple(table.shape):
            raise CheckpointError(f"{f}: key 'position_embedding.weight' has shape {list(rel.positions.shape)} but "
                                  f"{name} has a position table of shape {list(table.shape)}")
        # Tolerance: the file holds the base model's fp32 table; the model may hold it in fp16 (rel. error ~5e-4).
        if not torch.allclose(rel.positions, table.detach().float().cpu(), rtol=1e-2, atol=1e-3):
            raise CheckpointError(f"{f}: key 'position_embedding.weight' differs from the position table of {name}; "
                                  "the prefix was trained on another base model")
        dim = emb.token_embedding.weight.shape[1]
        if rel.prefix_rows.shape[1] != dim:
            raise CheckpointError(f"{f}: key 'token_embedding.weight' has rows of width {rel.prefix_rows.shape[1]} "
                                  f"but {name} embeds tokens in width {dim}")
    return out


def load_released(paths: Sequence[str | Path], components, ema: bool = True) -> dict:
    """Apply the authors' released files to `components` (which must have no adapters yet); returns what was loaded.

    `paths`: folders holding any of `text_encoder_lora[_EMA].pth`, `unet_lora[_EMA].pth`, `prefix_embedding[_EMA].pth`
    (EMA preferred unless `ema=False`), or those files. LoRA semantics y = W x + up(down(x)) become peft LoRA with
    r = alpha = the rank inferred from each file's shapes; prefix rows 1..n become `<common-token1..n>`. Strict:
    `read_released` then `check_released` against these components; each problem is an error naming the file and the
    key. Returns `Released.summary()`.
    """
    rel = read_released(paths, ema)
    if trainable_parameters(components):
        raise ValueError("load_released: the components already have adapters; start from fresh components")
    modules = check_released(rel, components)
    for part, rank in rel.ranks.items():
        add_lora(components, part == "text_encoder", part == "unet", rank)
    n_prefix = 0 if rel.prefix_rows is None else rel.prefix_rows.shape[0]
    if n_prefix:
        add_prefix_tokens(components, n_prefix, seed=0)
    converted = {f"{part}.{module}.lora_{which}.weight": rel.lora[part][k]
                 for part, names in modules.items() for k, (module, which) in names.items()}
    if n_prefix:
        converted[PREFIX_KEY] = rel.prefix_rows
    load_trainable_state_dict(components, converted, source=" + ".join(str(f) for f in rel.files.values()))
    return rel.summary()


def write_released(rel: Released, out_dir: str | Path, metadata: dict | None = None) -> Path:
    """Write `rel` in the interchange formats without a base model: the files, tensors and adapter metadata that
    `load_released` into the base model followed by `save_lora` writes (the module names come from the released keys,
    docs/method.md#released-checkpoint-format). One field cannot come from a base: the text encoder's peft
    `base_model_name_or_path` is "", the value
    transformers records for a model without a checkpoint name. Returns the main file (or the folder)."""
    from diffusers import StableDiffusionPipeline

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    info: dict = {"metadata": metadata or {}}
    main: Path | None = None
    layers, meta = {}, {}
    for part, targets in (("text_encoder", TE_TARGETS), ("unet", UNET_TARGETS)):
        if part not in rel.lora:
            continue
        named = (_released_module(part, k) + (v,) for k, v in rel.lora[part].items())
        layers[part] = {f"{module}.lora_{which}.weight": v.contiguous() for module, which, v in named}
        cfg = _lora_config(rel.ranks[part], targets)
        if part == "text_encoder":
            cfg.base_model_name_or_path = ""  # transformers' add_adapter records the model's name_or_path here
        meta[part] = cfg.to_dict()
        info[part] = {"rank": cfg.r, "alpha": cfg.lora_alpha, "targets": sorted(cfg.target_modules),
                      "tensors": len(layers[part])}
    if layers:
        StableDiffusionPipeline.save_lora_weights(
            out, unet_lora_layers=layers.get("unet"), text_encoder_lora_layers=layers.get("text_encoder"),
            unet_lora_adapter_metadata=meta.get("unet"), text_encoder_lora_adapter_metadata=meta.get("text_encoder"),
        )
        main = out / LORA_FILE
    if rel.prefix_rows is not None:
        tokens = [PREFIX_TOKEN.format(i=i) for i in range(1, len(rel.prefix_rows) + 1)]
        files = _write_token_files(out, tokens, rel.prefix_rows)
        info["prefix"] = {"tokens": tokens, "files": files, "prompt_prefix": "".join(tokens)}
        main = main or out
    return _finish_export(out, info, main, "write_released: nothing to write (no LoRA and no prefix file was read)")
