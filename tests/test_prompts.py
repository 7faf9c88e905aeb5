"""The project's own prompt files in data/prompts/: keys, split sizes, disjointness, spelling.

Oracles are hand-copied from the paper and its project page: the paper's 10 validation occupations, the occupations
the project page shows as unseen test prompts, the paper's template, the authors' JSON keys (docs/data.md), and the
six LAION captions of the project page. Our own files are read by path (never through data/1-prompts/, which holds the
authors' files when data.zip is unpacked).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from common.prompts import load_prompt_sets, load_prompts

PROMPTS = Path(__file__).resolve().parents[1] / "data" / "prompts"
TEMPLATE = "a photo of the face of a {occupation}, a person"
# the paper's validation occupations, in its order (exp-5 validation takes the first five).
PAPER_VAL = ["housekeeping cleaner", "freelance writer", "lieutenant", "fine artist", "administrative law judge",
             "librarian", "sale", "anesthesiologist", "secondary school teacher", "dancer"]
# the templated test prompts on the project page (gender/race and age examples).
PAGE_TEST = ["electrical and electronics repairer", "cardiologist", "farm equipment service technician", "geologist",
             "senator", "gas compressor and gas pumping station operator", "custodian", "butcher", "inventor", "citizen"]
# the project page's non-templated LAION captions.
PAGE_LAION = ["A philosopher reading. Oil painting", "A chef in a white coat leans on a table",
              "bartender at willard intercontinental makes mint julep", "English writer and essayist",
              "portrait of a flamenco dancer", "student with globe"]
EXP5_FILES = ["occupation_w_style_and_context.json", "personal_descriptor.json", "sports.json"]
SPLIT_KEYS = ["train_prompts", "val_prompts", "test_prompts"]


def _load(name: str) -> dict:
    return json.loads((PROMPTS / name).read_text())


@pytest.fixture(scope="module")
def occ() -> dict:
    return _load("occupation.json")


def _squash(s: str) -> str:
    """Letters only: two titles equal after this differ only by spaces, hyphens or other punctuation."""
    return re.sub("[^a-z]", "", s.lower())


def _contains_phrase(text: str, phrase: str) -> bool:
    return re.search(rf"\b{re.escape(phrase)}\b", text) is not None


def test_occupation_keys_and_types(occ):
    expected = {"prompt_templates_train", "prompt_templates_test", "occupations_train_set", "occupations_val_set",
                "occupations_test_set", "test_prompts"}
    assert set(occ) == expected
    for key, value in occ.items():
        assert isinstance(value, list) and value and all(isinstance(x, str) and x == x.strip() for x in value), key
    assert occ["prompt_templates_train"] == [TEMPLATE]
    assert occ["prompt_templates_test"] == [TEMPLATE]


def test_occupation_split_sizes_and_paper_lists(occ):
    assert len(occ["occupations_train_set"]) >= 1000
    assert occ["occupations_val_set"] == PAPER_VAL
    assert len(occ["occupations_test_set"]) == 50
    missing = [o for o in PAGE_TEST if o not in occ["occupations_test_set"]]
    assert not missing, f"project-page test occupations missing from the test set: {missing}"


def test_occupations_distinct_disjoint_lowercase(occ):
    splits = {k: occ[k] for k in ("occupations_train_set", "occupations_val_set", "occupations_test_set")}
    everything = [o for names in splits.values() for o in names]
    assert len(set(everything)) == len(everything), "an occupation is repeated within or across splits"
    squashed = [_squash(o) for o in everything]
    assert len(set(squashed)) == len(squashed), "two occupations differ only by punctuation or spacing"
    for o in everything:
        assert o == o.lower(), o
        assert re.fullmatch(r"[a-z][a-z \-]*[a-z]", o), f"unexpected characters in '{o}'"
        assert "  " not in o, o
    # Singular titles: no last word ends in "s" except the singular nouns listed here (checked by hand).
    singular_s = {"ceremonies"}  # "master of ceremonies"
    plural_like = [o for o in everything if o.split()[-1].endswith("s") and o.split()[-1] not in singular_s]
    assert not plural_like, f"titles that look plural: {plural_like}"


def test_occupation_test_prompts_are_the_template(occ):
    # The template filled by plain string replacement (independent of str.format used by the loader).
    expected = [TEMPLATE.replace("{occupation}", o) for o in occ["occupations_test_set"]]
    assert occ["test_prompts"] == expected


@pytest.mark.parametrize("name", EXP5_FILES)
def test_exp5_files_keys_sizes_disjoint(name):
    d = _load(name)
    assert set(d) == set(SPLIT_KEYS)
    sizes = {k: len(d[k]) for k in SPLIT_KEYS}
    minimum = {"occupation_w_style_and_context.json": (150, 5, 20), "personal_descriptor.json": (50, 5, 10),
               "sports.json": (60, 5, 15)}[name]
    assert tuple(sizes[k] for k in SPLIT_KEYS)[0] >= minimum[0], sizes
    assert (sizes["val_prompts"], sizes["test_prompts"]) == minimum[1:], sizes
    everything = [p for k in SPLIT_KEYS for p in d[k]]
    assert all(isinstance(p, str) and p == p.strip() and p == p.lower() and p for p in everything)
    assert len(set(everything)) == len(everything), f"{name}: a prompt repeats within or across splits"


def test_exp5_train_prompts_hold_no_heldout_occupation(occ):
    """exp-5 trains on these files together with the occupations: no val/test occupation may leak into training."""
    heldout = occ["occupations_val_set"] + occ["occupations_test_set"]
    laion = _load("LAION-aesthetics-V2-occupation-related.json")["test_prompts"]
    for name in EXP5_FILES:
        for prompt in _load(name)["train_prompts"]:
            leaked = [o for o in heldout if _contains_phrase(prompt, o)]
            assert not leaked, f"{name}: train prompt '{prompt}' names held-out occupations {leaked}"
            assert prompt not in {c.lower() for c in laion}


def test_style_val_and_test_use_heldout_occupations(occ):
    """Style/context val prompts name a validation occupation and test prompts a test occupation (one each)."""
    d = _load("occupation_w_style_and_context.json")
    for key, names in (("val_prompts", occ["occupations_val_set"]), ("test_prompts", occ["occupations_test_set"])):
        for prompt in d[key]:
            hits = [o for o in names if _contains_phrase(prompt, o)]
            assert len(hits) == 1, f"'{prompt}' should name exactly one {key[:-8]} occupation, found {hits}"


def test_personal_descriptors_disjoint_and_well_formed():
    d = _load("personal_descriptor.json")
    pattern = re.compile(r"a photo of the face of (a|an) ([a-z]+) person")
    words = {}
    for key in SPLIT_KEYS:
        words[key] = []
        for prompt in d[key]:
            m = pattern.fullmatch(prompt)
            assert m, f"'{prompt}' is not 'a photo of the face of a/an DESCRIPTOR person'"
            article, word = m.groups()
            # English article by sound: vowel letters take "an"; the silent-h "honest" too.
            wants_an = word[0] in "aeiou" or word.startswith("honest")
            assert article == ("an" if wants_an else "a"), prompt
            words[key].append(word)
    for a in SPLIT_KEYS:
        for b in SPLIT_KEYS:
            if a < b:
                assert not set(words[a]) & set(words[b]), (a, b, set(words[a]) & set(words[b]))
    # Descriptors that name a debiased attribute would fight the target distribution.
    attribute_words = {"young", "old", "elderly", "male", "female", "masculine", "feminine", "black", "white", "asian"}
    assert not attribute_words & {w for ws in words.values() for w in ws}


def test_laion_captions():
    d = _load("LAION-aesthetics-V2-occupation-related.json")
    assert set(d) == {"test_prompts"}
    captions = d["test_prompts"]
    assert len(captions) >= 40 and len(set(captions)) == len(captions)
    assert all(isinstance(c, str) and c.strip() == c and c for c in captions)
    missing = [c for c in PAGE_LAION if c not in captions]
    assert not missing, f"project-page LAION captions missing: {missing}"
    # Non-templated: none of them is the occupation template.
    assert not any(c.startswith("a photo of the face of") for c in captions)


def test_loader_reads_our_files(occ):
    """common.prompts resolves our files by path: the Cartesian product for occupations and exp-5's mixing."""
    train = load_prompts(f"{PROMPTS / 'occupation.json'}:train")
    assert train == [TEMPLATE.replace("{occupation}", o) for o in occ["occupations_train_set"]]
    assert load_prompts(f"{PROMPTS / 'occupation.json'}:test") == occ["test_prompts"]
    mix = load_prompt_sets([f"{PROMPTS / 'occupation.json'}:train",
                            f"{PROMPTS / 'occupation_w_style_and_context.json'}:train*6",
                            f"{PROMPTS / 'personal_descriptor.json'}:train*20",
                            f"{PROMPTS / 'sports.json'}:train*4"])
    sizes = [len(_load(n)["train_prompts"]) for n in EXP5_FILES]
    # the authors' exp-5 mix (docs/data.md): occupations + 6x style + 20x descriptors + 4x sports, concatenated.
    assert len(mix) == len(occ["occupations_train_set"]) + 6 * sizes[0] + 20 * sizes[1] + 4 * sizes[2]
    assert load_prompts(f"{PROMPTS / 'LAION-aesthetics-V2-occupation-related.json'}:test") == \
        _load("LAION-aesthetics-V2-occupation-related.json")["test_prompts"]
