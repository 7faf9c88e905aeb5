"""Name -> factory tables with one calling convention, and the plug-ins that fill them.

- `Registry(kind)`: `register(name, factory, synthetic=False)` with a callable or a "module:attr" string (imported on
  first use), `names()`, `create(name, **kw)` (the factory gets keyword arguments only) and an unknown name's
  `KeyError("unknown {kind} 'x'; registered: [...]")`. `synthetic` marks what is built in the process and CPU-sized
  (random test models, synthetic worlds): such names need no GPU (`common.runtime.require_device`).
- `registry(kind)`: the project's shared table of one of `KINDS`, the same object for the module that owns the kind
  (e.g. `common.classifiers`) and for plug-ins.
- Plug-ins: modules that register names when imported. The bundled ones (`plugin.py` of a sub-package of this
  package: the toy world's) and those installed under the entry point group `fair_diffusion.plugins` (value: a module)
  are imported once, the first time any registry misses a name or is listed; no other module imports a plug-in.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Iterator, MutableMapping
from importlib import metadata
from pathlib import Path

PLUGIN_MODULE = "plugin"
"""a sub-package's module of this name is a bundled plug-in, imported even when no entry point names it (a checkout
that was never pip-installed)"""
ENTRY_POINT_GROUP = "fair_diffusion.plugins"
KINDS = ("model source", "prompt source", "classifier", "face detector", "image encoder", "face encoder")
"""the shared registries: model names built by a factory (`common.models`), prompt-set names that are not files
(`common.prompts`), attribute classifiers, face detectors (`common.faces`), image and face encoders (`common.features`)"""

Factory = Callable[..., object] | str


class Registry(MutableMapping):
    """Names -> factories of one kind. As a mapping: `name in r`, `r[name]` (the factory, imported), `r[name] = f`
    (register, not synthetic), `del r[name]`, iteration over `names()`."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, tuple[Factory, bool]] = {}

    def register(self, name: str, factory: Factory, *, synthetic: bool = False) -> None:
        """Register `factory` under `name` (replacing an earlier one): a callable taking keyword arguments, or a
        "module:attr" string imported on first use."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} name must be a non-empty string; got {name!r}")
        if not (callable(factory) or (isinstance(factory, str) and factory.count(":") == 1)):
            raise TypeError(f"{self.kind} '{name}': the factory must be a callable or a 'module:attr' string; "
                            f"got {factory!r}")
        self._entries[name] = (factory, bool(synthetic))

    def names(self) -> list[str]:
        """Every registered name, sorted (plug-ins loaded first)."""
        load_plugins()
        return sorted(self._entries)

    def synthetic(self) -> set[str]:
        """The names registered with `synthetic=True`."""
        load_plugins()
        return {n for n, (_, synthetic) in self._entries.items() if synthetic}

    def unknown(self, name: str, hint: str = "") -> KeyError:
        """The error for a name that is not registered (`hint` is appended: other accepted forms)."""
        return KeyError(f"unknown {self.kind} '{name}'; registered: {self.names()}{hint}")

    def factory(self, name: str) -> Callable[..., object]:
        """The factory of `name`, its "module:attr" imported (once); KeyError `unknown(name)` when not registered."""
        if name not in self:
            raise self.unknown(name)
        factory, synthetic = self._entries[name]
        if isinstance(factory, str):
            module, _, attr = factory.partition(":")
            try:
                factory = getattr(importlib.import_module(module), attr)
            except (ImportError, AttributeError) as e:
                raise ImportError(f"'{module}:{attr}' could not be imported ({e}); it provides the registered "
                                  f"{self.kind} '{name}'.") from e
            self._entries[name] = (factory, synthetic)
        return factory

    def accepts(self, name: str, option: str) -> bool:
        """True when the factory of `name` takes the keyword argument `option`."""
        params = _parameters(self.factory(name))
        return params is None or option in params

    def create(self, name: str, **kw):
        """`factory(**kw)` of `name`; a TypeError naming the options it takes when it takes none of some of `kw`."""
        fn = self.factory(name)
        params = _parameters(fn)
        extra = sorted(set(kw) - params) if params is not None else []
        if extra:
            raise TypeError(f"{self.kind} '{name}' takes no option(s) {extra}; its options are {sorted(params)}")
        return fn(**kw)

    def __contains__(self, name: object) -> bool:
        if name in self._entries:
            return True
        load_plugins()
        return name in self._entries

    def __getitem__(self, name: str) -> Callable[..., object]:
        return self.factory(name)

    def __setitem__(self, name: str, factory: Factory) -> None:
        self.register(name, factory)

    def __delitem__(self, name: str) -> None:
        if name not in self._entries:
            raise self.unknown(name)
        del self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {sorted(self._entries)})"


def _parameters(fn) -> set[str] | None:
    """The keyword arguments `fn` takes; None when it takes any (**kw) or its signature cannot be read."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


_SHARED: dict[str, Registry] = {}


def registry(kind: str) -> Registry:
    """The shared registry of `kind` (one of `KINDS`), created on first use by whichever module asks first."""
    if kind not in KINDS:
        raise KeyError(f"unknown registry kind '{kind}'; expected one of {list(KINDS)}")
    if kind not in _SHARED:
        _SHARED[kind] = Registry(kind)
    return _SHARED[kind]


_plugin_state = {"loaded": False, "loading": False}


def plugin_modules() -> list[str]:
    """The plug-in modules to import: the bundled ones (`<package>/<sub-package>/plugin.py`), then the entry points'
    modules not already listed."""
    package = __name__.rpartition(".")[0]
    here = Path(__file__).resolve().parent
    mods = [f"{package}.{f.parent.name}.{PLUGIN_MODULE}" for f in sorted(here.glob(f"*/{PLUGIN_MODULE}.py"))]
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.attr:
            raise ValueError(f"entry point '{ep.name} = {ep.value}' of group {ENTRY_POINT_GROUP}: expected a module "
                             "(it registers its names when imported), not 'module:attr'")
        if ep.module not in mods:
            mods.append(ep.module)
    return mods


def load_plugins() -> None:
    """Import every plug-in module once (a plug-in's own registry calls during its import do not recurse). A plug-in
    that fails to import raises ImportError naming it, and is tried again on the next call."""
    if _plugin_state["loaded"] or _plugin_state["loading"]:
        return
    _plugin_state["loading"] = True
    try:
        for mod in plugin_modules():
            try:
                importlib.import_module(mod)
            except ImportError as e:
                raise ImportError(f"plug-in '{mod}' could not be imported ({e}); it is bundled or named by a "
                                  f"'{ENTRY_POINT_GROUP}' entry point.") from e
        _plugin_state["loaded"] = True
    finally:
        _plugin_state["loading"] = False
