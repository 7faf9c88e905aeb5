"""common/registry.py: one calling convention, lazy "module:attr" imports, the unknown-name sentence, synthetic names,
plug-ins (bundled and entry points), and the toy world registering itself without the product naming it."""

import subprocess
import sys
import textwrap
from fractions import Fraction
from importlib import metadata
from pathlib import Path

import pytest

from common import registry as R

ROOT = Path(__file__).resolve().parents[1]


def _module(tmp_path, monkeypatch, name: str, source: str) -> str:
    """Write an importable module `name` into tmp_path (on sys.path for this test); returns its name."""
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def test_create_calls_the_factory_with_keywords_and_imports_a_string_factory_on_first_use(tmp_path, monkeypatch):
    mod = _module(tmp_path, monkeypatch, "registry_lazy_factory", """
        def make(size=1, label="x"):
            return ("made", size, label)
    """)
    r = R.Registry("widget")
    r.register("frac", Fraction)
    r.register("lazy", f"{mod}:make", synthetic=True)
    assert r.names() == ["frac", "lazy"] and "lazy" in r and "nope" not in r
    assert mod not in sys.modules  # registering and listing import nothing
    assert r.create("frac", numerator=2, denominator=6) == Fraction(1, 3)
    assert r.create("lazy", size=3) == ("made", 3, "x")
    assert mod in sys.modules
    assert r.synthetic() == {"lazy"}
    assert r.accepts("lazy", "size") and not r.accepts("lazy", "seed")


def test_errors_are_one_sentence_naming_what_is_wrong():
    r = R.Registry("widget")
    r.register("b", Fraction)
    r.register("a", "registry_no_such_module_xyz:make")
    with pytest.raises(KeyError) as e:
        r.create("nope")
    assert e.value.args[0] == "unknown widget 'nope'; registered: ['a', 'b']"
    with pytest.raises(TypeError, match=r"widget 'b' takes no option\(s\) \['colour'\]; its options are"):
        r.create("b", colour=1)
    with pytest.raises(ImportError, match="'registry_no_such_module_xyz:make' could not be imported .*widget 'a'"):
        r.create("a")
    with pytest.raises(TypeError, match="'module:attr' string"):
        r.register("c", "no_colon_here")
    with pytest.raises(KeyError, match="unknown registry kind 'widget'"):
        R.registry("widget")


def test_mapping_view_registers_and_removes(monkeypatch):
    """Tests patch registries as mappings (monkeypatch.setitem): the name is there while patched, gone after."""
    reg = R.registry("classifier")
    with monkeypatch.context() as m:
        m.setitem(reg, "test-patched", Fraction)
        assert "test-patched" in reg.names() and reg["test-patched"] is Fraction
    assert "test-patched" not in reg


def test_the_toy_world_registers_itself_lazily():
    """A fresh interpreter: the product modules register no toy names; listing a registry imports the bundled
    plug-in, which registers toy everywhere as synthetic, still without importing the toy models."""
    code = textwrap.dedent("""
        import sys
        from common.classifiers import list_classifiers
        from common.faces import DETECTORS
        from common.features import IMAGE_ENCODERS
        from common.models import MODEL_SOURCES
        from common.prompts import PROMPT_SOURCES
        assert not any(m.startswith("common.toy") for m in sys.modules), sorted(sys.modules)
        assert "toy" in list_classifiers()
        for r in (DETECTORS, IMAGE_ENCODERS, MODEL_SOURCES, PROMPT_SOURCES):
            assert "toy" in r.synthetic(), r
        assert "common.toy.plugin" in sys.modules and "common.toy.judges" not in sys.modules
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def _fresh_plugins(monkeypatch, reg):
    """Plug-ins not loaded yet, and `reg`'s entries restored after the test."""
    monkeypatch.setattr(R, "_plugin_state", {"loaded": False, "loading": False})
    monkeypatch.setattr(reg, "_entries", dict(reg._entries))


def test_an_entry_point_plugin_is_imported_on_a_miss(tmp_path, monkeypatch):
    mod = _module(tmp_path, monkeypatch, "registry_ep_plugin", """
        from common.registry import registry
        registry("classifier").register("test-ep-judge", "fractions:Fraction", synthetic=True)
    """)
    reg = R.registry("classifier")
    _fresh_plugins(monkeypatch, reg)
    ep = metadata.EntryPoint(name="extra", value=mod, group=R.ENTRY_POINT_GROUP)
    monkeypatch.setattr(R.metadata, "entry_points", lambda group: [ep] if group == R.ENTRY_POINT_GROUP else [])
    assert R.plugin_modules() == ["common.toy.plugin", mod]
    assert "test-ep-judge" in reg and "test-ep-judge" in reg.synthetic()

    bad = metadata.EntryPoint(name="bad", value=f"{mod}:thing", group=R.ENTRY_POINT_GROUP)
    monkeypatch.setattr(R.metadata, "entry_points", lambda group: [bad])
    with pytest.raises(ValueError, match="expected a module"):
        R.plugin_modules()


def test_a_broken_plugin_says_so_and_is_retried(monkeypatch):
    reg = R.registry("classifier")
    _fresh_plugins(monkeypatch, reg)
    ep = metadata.EntryPoint(name="broken", value="registry_missing_plugin_xyz", group=R.ENTRY_POINT_GROUP)
    monkeypatch.setattr(R.metadata, "entry_points", lambda group: [ep])
    for _ in range(2):  # not marked loaded after a failure
        with pytest.raises(ImportError, match="plug-in 'registry_missing_plugin_xyz' could not be imported"):
            reg.names()


def test_synthetic_sets_come_from_the_registrations():
    """The device rule's sets, once hard-coded, are now the registries' synthetic names: the same members."""
    from common.evaluate import synthetic_judges
    from common.models import model_source
    from common.runtime import is_synthetic, synthetic_models

    assert synthetic_models() == {"toy", "tiny", "tiny-sdxl"}
    assert synthetic_judges() == {"toy", "random-fairface8", "tiny-clip", "tiny-dino"}
    assert model_source("tiny-sdxl:12") == ("tiny-sdxl", {"seed": 12}) and model_source("tiny") == ("tiny", {})
    assert [is_synthetic(m) for m in ("tiny:3", "toy", "toy:3", "tiny:x", "some/model")] == [True, True, False,
                                                                                           False, False]


def test_the_product_does_not_name_the_toy_world_or_import_tools():
    """common/*.py (outside common/toy/) holds no quoted toy name, no import of common.toy, scripts or research."""
    offenders = []
    for f in sorted((ROOT / "common").glob("*.py")):
        text = f.read_text()
        for needle in ('"toy"', "common.toy", "from scripts", "import scripts", "from research",
                       "import research"):
            if needle in text:
                offenders.append(f"{f.name}: {needle}")
    assert offenders == []
