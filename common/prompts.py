"""Prompt sets: `FILE:SPLIT[*REPEAT]` specs resolved to lists of complete prompts.

FILE is a JSON in the authors' layout (data.zip `1-prompts/`), looked up in the data folder (`paths.data_dir`, see
`common.config.data_root`): its `1-prompts/` first (so an unpacked data.zip wins), then the project's own `prompts/`,
then the data folder itself; an absolute path is taken as is, and a command line's path relative to the working
directory is too (`cwd=True`), never a config's. A `.txt` file holds one
prompt per line. SPLIT is `train`, `val` or `test`, or any key of the file holding a list of prompts. A FILE that is a
registered prompt source (`PROMPT_SOURCES`, filled by plug-ins: the toy world's `train` / `heldout`) is not a file:
its factory gives the split's prompts.
"""

from __future__ import annotations

import json
from pathlib import Path

from common.registry import registry

PROMPT_SOURCES = registry("prompt source")
"""prompt-set names that are not files: `factory(split=...) -> list[str]`, KeyError for an unknown split"""

SPLITS = {
    # split -> (templates key, occupations key) for occupation.json; otherwise a `{split}_prompts` key
    "train": ("prompt_templates_train", "occupations_train_set"),
    "val": ("prompt_templates_test", "occupations_val_set"),
    "test": ("prompt_templates_test", "occupations_test_set"),
}


def resolve_file(name: str, data_dir: str | Path | None = None, cwd: bool = False) -> Path:
    """Find a prompt file: an absolute path (or, with `cwd`, a path from the working directory), else
    DATA/1-prompts/NAME, DATA/prompts/NAME, DATA/NAME with DATA = `data_root(data_dir)`."""
    from common.config import data_root

    p = Path(name).expanduser()
    if p.is_absolute() or (cwd and p.is_file()):
        if p.is_file():
            return p.resolve()
        raise FileNotFoundError(f"prompt file {p} not found")
    data = data_root(data_dir)
    tried = (data / "1-prompts" / name, data / "prompts" / name, data / name)
    for cand in tried:
        if cand.is_file():
            return cand
    raise FileNotFoundError(f"prompt file '{name}' not found: tried {', '.join(map(str, tried))} (the first is where "
                            f"the data.zip entry 1-prompts/{name} unpacks)")


def _from_json(path: Path, split: str) -> list[str]:
    d = json.loads(path.read_text())
    if split == "test" and "test_prompts" in d:
        return list(d["test_prompts"])
    if split in SPLITS and SPLITS[split][1] in d:
        tkey, okey = SPLITS[split]
        templates = d.get(tkey) or d.get("prompt_templates_test") or d.get("prompt_templates_train")
        if not templates:
            raise KeyError(f"{path}: split '{split}' needs the key '{tkey}' (a list of templates with '{{occupation}}')")
        return [t.format(occupation=o) for o in d[okey] for t in templates]
    for key in (f"{split}_prompts", split):
        if key in d:
            if not isinstance(d[key], list) or not all(isinstance(x, str) for x in d[key]):
                raise ValueError(f"{path}: key '{key}' must be a list of prompt strings")
            return list(d[key])
    keys = [k for k, v in d.items() if isinstance(v, list)]
    raise KeyError(f"{path}: no prompts for split '{split}'; list-valued keys in the file: {keys}")


def load_prompts(spec: str, data_dir: str | Path | None = None, cwd: bool = False) -> list[str]:
    """Prompts of one `FILE:SPLIT[*REPEAT]` spec (REPEAT oversamples a small set, as exp-5's mixing)."""
    repeat = 1
    if "*" in spec:
        spec, rep = spec.rsplit("*", 1)
        if not rep.isdigit() or int(rep) < 1:
            raise ValueError(f"prompt spec '{spec}*{rep}': the repetition must be a positive integer")
        repeat = int(rep)
    name, _, split = spec.rpartition(":") if ":" in spec else (spec, "", "")
    if name in PROMPT_SOURCES:
        try:
            prompts = PROMPT_SOURCES.create(name, split=split)
        except KeyError as e:  # the source's sentence about its splits, prefixed with the spec
            raise KeyError(f"prompt spec '{spec}': {e.args[0] if e.args else e}") from None
    else:
        path = resolve_file(name, data_dir, cwd)
        if path.suffix == ".txt":
            prompts = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
        else:
            prompts = _from_json(path, split or "test")
    if not prompts:
        raise ValueError(f"prompt spec '{spec}' resolved to no prompts")
    return prompts * repeat


def load_prompt_sets(specs: list[str], data_dir: str | Path | None = None, limit: int | None = None,
                     cwd: bool = False) -> list[str]:
    """Concatenate several specs; `limit` keeps the first N prompts of each."""
    out: list[str] = []
    for s in specs:
        out += load_prompts(s, data_dir, cwd)[: limit or None]
    return out
