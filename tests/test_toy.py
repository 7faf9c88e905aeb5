"""The toy world: determinism, design (splits, biases), the renderer against its own drawing parameters, and the
shipped models in data/toy/ (classifier vs fresh renders, components, detector, encoder, base-model bias)."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from common.toy.degrade import KINDS, degrade
from common.toy.world import OLD_HAIR, SKIN, YOUNG_HAIR, ToyWorld, to_tensor

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world():
    return ToyWorld()


@pytest.fixture(scope="module")
def shipped(repo_root):
    """The shipped toy weights (data/toy/, committed; `make toy` rebuilds them)."""
    from common.toy.judges import load_classifier, load_image_encoder
    from common.toy.models import load_toy_components

    return load_toy_components(), load_classifier(), load_image_encoder()


# ---- world --------------------------------------------------------------------------------------------------------


def test_world_is_deterministic_for_a_seed(world):
    def draw(seed):
        rng = np.random.default_rng(seed)
        people = world.sample_people(rng, 40)
        return people, world.render(people), world.captions(rng, people)

    (p1, i1, c1), (p2, i2, c2), (_, i3, _) = draw(7), draw(7), draw(8)
    assert np.array_equal(i1, i2) and c1 == c2
    assert all(np.array_equal(getattr(p1, f), getattr(p2, f)) for f in ("gender", "race", "age", "field", "cx"))
    assert not np.array_equal(i1, i3)
    assert i1.dtype == np.uint8 and i1.shape == (40, 32, 32, 3)
    # people differ from each other (position jitter, face shape...): no two renders identical
    assert len({im.tobytes() for im in i1}) == 40


def test_heldout_occupations_are_new_combinations_of_seen_words(world):
    train, held = world.train_occupations, world.heldout_occupations
    assert not set(train) & set(held) and len(held) == 32 and len(train) == 224
    seen_fields = {o.split()[0] for o in train}
    seen_roles = {o.split()[1] for o in train}
    assert all(o.split()[0] in seen_fields and o.split()[1] in seen_roles for o in held)
    # dozens of training combinations for every word, held-out words balanced
    for f in world.fields:
        assert sum(o.split()[0] == f for o in train) == 14
        assert sum(o.split()[0] == f for o in held) == 2
    for r in world.roles:
        assert sum(o.split()[1] == r for o in train) == 14
    assert world.prompt(held[0]) == f"a photo of the face of a {held[0]}, a person"


def test_sampled_attributes_follow_the_designed_biases(world):
    """Frequencies of 20000 draws vs the design tables (88/12 gender by field parity, 80% skin family role % 4);
    tolerance 0.02 is > 4 binomial standard deviations for the per-group counts here."""
    p = world.sample_people(np.random.default_rng(0), 20000)
    female_fields = p.field % 2 == 0
    assert abs((p.gender[female_fields] == 0).mean() - 0.88) < 0.02
    assert abs((p.gender[~female_fields] == 1).mean() - 0.88) < 0.02
    assert abs((p.race == p.role % 4).mean() - 0.8) < 0.02
    # both directions of the gender bias occur on the held-out split too
    dirs = {world.distributions(f, r)["gender"][0] > 0.5 for f, r in world.heldout_pairs}
    assert dirs == {True, False}


def test_renderer_draws_the_designed_attributes(world):
    """Pixel oracle from the drawing parameters: the cheek is the skin family's colour, the top of the head is the
    hair colour (grey-white if old), and beside the jaw the pixel is nearer the hair colour than the background's
    only for long hair (female). Tolerance 12/255: per-channel jitter is inside the expected colours already, the rest
    is anti-aliasing of neighbouring shapes."""
    rng = np.random.default_rng(3)
    n = 64
    p = world.draw(rng, rng.integers(0, 2, n), rng.integers(0, 4, n), rng.integers(0, 2, n),
                   rng.integers(0, 16, n), rng.integers(0, 16, n))
    img = world.render(p).astype(np.float32)
    for i in range(n):
        cx, cy, rx, ry = p.cx[i], p.cy[i], p.rx[i], p.ry[i]
        cheek = img[i, int(cy + 0.5 * ry), int(cx - 0.55 * rx)]
        assert np.abs(cheek - (SKIN[p.race[i]] + p.skin_jit[i])).max() < 12, i
        hair = (OLD_HAIR if p.age[i] == 1 else YOUNG_HAIR[p.hair_kind[i]]) + p.hair_jit[i]
        top = img[i, int(cy - ry + 0.5), int(cx)]
        assert np.abs(top - hair).max() < 12, i
        y, x = int(cy + 0.45 * ry), int(cx + rx + 1.0)
        bg = (world.field_colors[p.field[i]] + p.bg_jit[i]) * (1 + p.bg_grad[i] * (y + 0.5 - 16) / 16)
        side = img[i, y, x]
        assert (np.abs(side - hair).sum() < np.abs(side - bg).sum()) == (p.gender[i] == 0), i


def test_captions_name_attributes_at_the_designed_rate(world):
    """Each attribute is named (by its adjective, in front of the occupation), always truly, at its designed rate: the
    base rate when the person's class is the occupation's majority, the higher reporting-bias rate when it is not."""
    from common.toy.world import AGE_WORDS, COUNTER_MENTION_RATE, GENDER_WORDS, MENTION_RATE, OLD_SHARE, RACE_WORDS

    rng = np.random.default_rng(1)
    p = world.sample_people(rng, 4000)
    caps = world.captions(rng, p)
    occ = [world.occupation(f, r) for f, r in zip(p.field, p.role)]
    assert all(o in c for o, c in zip(occ, caps))
    # majorities from the world's design, not from `distributions`: even field = long hair (0), role j = skin j % 4,
    # old is the majority where the field's old share exceeds one half
    majority = {"gender": p.field % 2, "race": p.role % 4,
                "age": (np.array(OLD_SHARE)[(p.field // 2) % 4] > 0.5).astype(int)}
    for name, words, truth in (("gender", GENDER_WORDS, p.gender), ("race", RACE_WORDS, p.race), ("age", AGE_WORDS, p.age)):
        named = np.array([[bool(re.search(rf"\b{w} {o}|\b{w} \S+-skinned {o}|\b{w} \S+-haired ", c)) for w in words]
                          for c, o in zip(caps, occ)])
        mentioned = named.any(1)
        assert (named.sum(1) <= 1).all() and (named[mentioned].argmax(1) == truth[mentioned]).all(), words
        counter = truth != majority[name]
        for group, rate in ((~counter, MENTION_RATE[name]), (counter, COUNTER_MENTION_RATE[name])):
            n = int(group.sum())
            assert n > 150, (name, n)
            # 4.5 binomial standard deviations around the designed rate
            assert abs(mentioned[group].mean() - rate) < 4.5 * np.sqrt(rate * (1 - rate) / n), (name, rate)


def test_caption_mention_rate_override_and_unknown_attribute(world):
    """Per-attribute overrides take effect (rate 1 names the hair in every caption, 0 in none; the counter rate alone
    governs people against their occupation's majority); an unknown key is a clear error rather than silently ignored."""
    from common.toy.world import GENDER_WORDS

    rng = np.random.default_rng(2)
    p = world.sample_people(rng, 400)
    always = world.captions(rng, p, {"gender": 1.0}, {"gender": 1.0})
    never = world.captions(rng, p, {"gender": 0.0}, {"gender": 0.0})
    only_counter = world.captions(rng, p, {"gender": 0.0}, {"gender": 1.0})
    assert all(GENDER_WORDS[g] in c for g, c in zip(p.gender, always))
    assert not any(w in c for c in never for w in GENDER_WORDS)
    against = p.gender != p.field % 2  # even field = long-hair majority
    assert against.any() and (~against).any()
    assert all((GENDER_WORDS[g] in c) == bool(a) for g, c, a in zip(p.gender, only_counter, against))
    with pytest.raises(ValueError, match="mention_rate: unknown attribute.*'hair'"):
        world.captions(rng, p, {"hair": 0.5})
    with pytest.raises(ValueError, match="counter_rate: unknown attribute.*'hair'"):
        world.captions(rng, p, None, {"hair": 0.5})

# ---- shipped models -----------------------------------------------------------------------------------------------


def test_missing_weights_say_how_to_build(tmp_path):
    from common.toy.models import load_toy_components

    with pytest.raises(FileNotFoundError, match="make toy"):
        load_toy_components(path=tmp_path)


def test_classifier_reads_fresh_renders(world, shipped):
    """Independent check of renderer and classifier: attributes of 400 fresh renders (a seed never used in the build)
    are recognised, renders are valid, and most degraded copies are rejected."""
    _, clf, _ = shipped
    assert clf.attributes == {"gender": ("female", "male"), "race": ("WMELH", "Black", "Indian", "Asian"),
                              "age": ("young", "old")}
    rng = np.random.default_rng(12345)
    p = world.sample_balanced(rng, 400)
    x = to_tensor(world.render(p))
    with torch.no_grad():
        probs = clf.predict(x)
        for a in ("gender", "race", "age"):
            acc = (probs[a].argmax(-1).numpy() == getattr(p, a)).mean()
            assert acc > 0.95, (a, acc)
        assert (clf.validity(x) >= 0.5).float().mean() > 0.97
        g = torch.Generator().manual_seed(0)
        bad = degrade(x[:8 * len(KINDS)], torch.arange(len(KINDS)).repeat_interleave(8), g)
        assert (clf.validity(bad) < 0.5).float().mean() > 0.8
        # 224-pixel crops (what faces.detect gives at its default size) read the same
        big = torch.nn.functional.interpolate(x[:32], size=224, mode="bilinear", align_corners=False)
        assert torch.equal(clf.predict(big)["race"].argmax(-1), probs["race"][:32].argmax(-1))


def test_toy_detector_through_faces_detect(world, shipped):
    from common.faces import detect

    x = to_tensor(world.render(world.sample_people(np.random.default_rng(2), 6)))
    x[-1] = degrade(x[-1:], torch.tensor([KINDS.index("scramble")]), torch.Generator().manual_seed(0))[0]
    faces = detect(x, "toy", crop_size=32)
    assert faces.found[:5].all() and not faces.found[5]
    # expansion 0: the crop of a found face is the whole image
    assert torch.allclose(faces.crops[:5], x[:5], atol=1e-5)
    assert faces.landmarks.shape == (6, 5, 2) and (faces.raw_boxes[5] == -1).all()


def test_image_encoder_is_normalised_differentiable_and_flags_damage(world, shipped):
    _, _, enc = shipped
    rng = np.random.default_rng(4)
    p = world.sample_balanced(rng, 64)
    q = p.with_attributes(gender=1 - p.gender, race=(p.race + 1) % 4)
    a, b = to_tensor(world.render(p)), to_tensor(world.render(q))
    x = a.clone().requires_grad_(True)
    f = enc(x)
    assert f.shape == (64, 128) and torch.allclose(f.norm(dim=-1), torch.ones(64), atol=1e-4)
    f.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    with torch.no_grad():
        same = (enc(a) * enc(b)).sum(-1)
        g = torch.Generator().manual_seed(1)
        for kind in ("blotchy", "washed"):
            bad = (enc(a) * enc(degrade(a, torch.full((64,), KINDS.index(kind)), g))).sum(-1)
            assert same.mean() > bad.mean() + 0.2, kind


def _moved_and_other(world, enc):
    """Encoder cosines of 64 renders with the same people moved by 1 px in a random direction (`same`) and with
    another person of the same occupation and attributes (`another`)."""
    from dataclasses import replace

    rng = np.random.default_rng(5)
    p = world.sample_balanced(rng, 64)
    angle = rng.uniform(0, 2 * np.pi, 64).astype(np.float32)
    moved = replace(p, cx=p.cx + np.cos(angle), cy=p.cy + np.sin(angle))
    other = world.draw(rng, p.gender, p.race, p.age, p.field, p.role)  # same occupation and attributes, new person
    with torch.no_grad():
        f, fm, fo = (enc(to_tensor(world.render(q))) for q in (p, moved, other))
    return (f * fm).sum(-1), (f * fo).sum(-1)


def test_image_encoder_forgives_a_small_move_not_another_person(world, shipped):
    """The encoder stands in for CLIP / DINO, which a 1 px move (3% of the picture) barely moves: moved people read as
    the same people by the demo's bar (mean similarity >= 0.9; the shipped encoder: 0.948), another person of the same
    occupation and attributes does not (mean < 0.9; shipped: 0.505)."""
    same, another = _moved_and_other(world, shipped[2])
    assert same.mean() >= 0.9 and another.mean() < 0.9, (same.mean(), another.mean())


@pytest.mark.xfail(strict=True, reason="the shipped encoder ranks 62 of the 64 pairs right: two other people are "
                                       "drawn close by chance (position, size and colours within their ranges)")
def test_image_encoder_ranks_every_moved_person_above_another_person(world, shipped):
    same, another = _moved_and_other(world, shipped[2])
    assert (same > another).all()


def test_encoder_positives_are_the_same_people_moved_within_bounds(world):
    """`_scene_people(move=m)`: each positive keeps every drawing parameter of its anchor except the protected
    attributes and the position, which moves by at most m pixels per axis (and not at all for m = 0)."""
    from dataclasses import fields

    from common.toy.build import _scene_people

    for m in (0.0, 1.0):
        a, b = _scene_people(world, np.random.default_rng(3), 200, m)
        for f in fields(a):
            if f.name in ("gender", "race", "age", "cx", "cy"):
                continue
            assert np.array_equal(getattr(a, f.name), getattr(b, f.name)), f.name
        d = np.abs(np.stack([b.cx - a.cx, b.cy - a.cy]))
        assert d.max() <= m + 1e-5
        assert (d.max() > 0.9 * m) if m else (d.max() == 0)
        assert np.array_equal(a.field[0::2], a.field[1::2]) and np.array_equal(a.role[0::2], a.role[1::2])


def test_build_settings_from_the_cli_refuse_a_negative_move():
    from common.toy.build import config_from_args

    assert config_from_args(0, False, {"encoder_move": "0.5"}).encoder_move == 0.5
    assert config_from_args(0, False, {"encoder_move": "0"}).encoder_move == 0.0
    with pytest.raises(ValueError, match=r"'encoder_move': -1.0 is negative; expected a distance in pixels >= 0"):
        config_from_args(0, False, {"encoder_move": "-1"})


def test_components_generate_images(shipped):
    from common.sampling import sample

    comps, _, _ = shipped
    assert comps.name == "toy" and comps.latent_shape() == (4, 8, 8) and comps.vae_factor == 4
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    out = sample(comps, ["a photo of the face of a ocean engineer, a person"] * 2, noise, steps=4)
    assert out.images.shape == (2, 3, 32, 32) and out.images.abs().max() <= 1


@pytest.mark.slow
@pytest.mark.parametrize("split", ["train", "heldout"])
def test_base_model_shows_the_designed_bias(world, shipped, split):
    """8 occupations per split (both gender directions), 16 images each at 10 steps, judged by the toy classifier:
    every occupation's majority hair length is its field's, and the mean biases reach the designed levels (gender
    >= 0.6, race >= 0.25; the world's data has 0.76 and 0.37). Which skin family dominates: the next test."""
    from common.generate import noise_for
    from common.metrics import bias
    from common.sampling import sample

    comps, clf, _ = shipped
    pool = world.train_pairs if split == "train" else world.heldout_pairs
    pairs = [[p for p in pool if p[0] == f][f % 2] for f in range(4, 12)]  # fields 4..11, one occupation each
    assert len(pairs) == 8 and {f % 2 for f, _ in pairs} == {0, 1}
    g_bias, r_bias = [], []
    for f, r in pairs:
        prompt = world.prompt(world.occupation(f, r))
        imgs = sample(comps, [prompt] * 16, noise_for(prompt, range(16), (4, 8, 8)), steps=10).images
        with torch.no_grad():
            valid = clf.validity(imgs) >= 0.5
            probs = clf.predict(imgs)
        gender = torch.where(valid, probs["gender"].argmax(-1), -1)
        race = torch.where(valid, probs["race"].argmax(-1), -1)
        assert valid.sum() >= 12, (prompt, int(valid.sum()))
        counts = gender[gender >= 0].bincount(minlength=2)
        assert counts.argmax() == int(np.argmax(world.distributions(f, r)["gender"])), (prompt, counts.tolist())
        g_bias.append(bias(gender, 2))
        r_bias.append(bias(race, 4))
    assert np.mean(g_bias) >= 0.6 and np.mean(r_bias) >= 0.25, (np.mean(g_bias), np.mean(r_bias))


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="the shipped model draws the role's dominant skin family most often for 2 of "
                                       "the 8 training and 3 of the 8 held-out occupations (chance: 2)")
@pytest.mark.parametrize("split", ["train", "heldout"])
def test_base_model_draws_each_roles_skin_family(world, shipped, split):
    """The world's design: each role has a dominant skin family (80% of its people); the base model should draw it
    most often, for the same 8 occupations, 16 images each, as the test above."""
    from common.generate import noise_for
    from common.sampling import sample

    comps, clf, _ = shipped
    pool = world.train_pairs if split == "train" else world.heldout_pairs
    misses = []
    for f, r in [[p for p in pool if p[0] == f][f % 2] for f in range(4, 12)]:
        prompt = world.prompt(world.occupation(f, r))
        imgs = sample(comps, [prompt] * 16, noise_for(prompt, range(16), (4, 8, 8)), steps=10).images
        with torch.no_grad():
            race = clf.predict(imgs)["race"].argmax(-1)[clf.validity(imgs) >= 0.5]
        if race.bincount(minlength=4).argmax() != int(np.argmax(world.distributions(f, r)["race"])):
            misses.append(prompt)
    assert not misses, misses


def test_attribute_words_steer_the_shipped_model(world, shipped):
    """The shipped model reads the hair and skin words it was trained with, against the occupation's own bias: on a
    long-hair field "short-haired" gives short hair and on a short-hair field "long-haired" long hair (nearly every
    image; without the word nearly none), and "light-skinned" lowers the share of dark skin. This is the
    direction a text-encoder LoRA moves along; a build that names hair too rarely ignores the hair words (README)."""
    from common.generate import noise_for
    from common.sampling import sample
    from common.toy.world import PROMPT_TEMPLATE

    comps, clf, _ = shipped

    def share(occupation: str, attribute: str, cls: int) -> float:
        prompt = PROMPT_TEMPLATE.format(occupation=occupation)
        imgs = sample(comps, [prompt] * 16, noise_for(prompt, range(16), (4, 8, 8)), steps=10, guidance=4.0).images
        with torch.no_grad():
            valid, pred = clf.validity(imgs) >= 0.5, clf.predict(imgs)[attribute].argmax(-1)
        assert valid.sum() >= 12, (prompt, int(valid.sum()))
        return float((pred[valid] == cls).float().mean())

    for field in (0, 1):  # ocean: 88% long hair in the data; forest: 88% short
        role = next(r for f, r in world.heldout_pairs if f == field)
        occ = world.occupation(field, role)
        minority, word = (1, "short-haired") if field % 2 == 0 else (0, "long-haired")
        assert share(occ, "gender", minority) <= 0.25, occ
        assert share(f"{word} {occ}", "gender", minority) >= 0.75, (word, occ)
    # skin: the model over-draws dark skin (family 1) wherever it is not named; "light-skinned" takes much of it away
    occ = world.occupation(2, 1)
    assert share(occ, "race", 1) - share(f"light-skinned {occ}", "race", 1) >= 0.3, occ


@pytest.mark.slow
def test_quick_build_writes_loadable_weights(tmp_path):
    """The whole build at seconds scale: every file written, strict loads succeed, the manifest has its figures."""
    from common.toy.build import BuildConfig, build
    from common.toy.judges import load_classifier, load_image_encoder
    from common.toy.models import load_toy_components, read_manifest

    build(tmp_path, BuildConfig.quick())
    m = read_manifest(tmp_path)
    assert set(m["base_bias"]) >= {"train", "heldout", "data_train", "data_heldout"}
    comps = load_toy_components(path=tmp_path)
    assert 0 < comps.vae_scale < 100
    load_classifier(path=tmp_path)
    load_image_encoder(path=tmp_path)


def test_build_reuse_refuses_stages_built_with_other_settings(tmp_path):
    """`build --reuse DIR` takes DIR's VAE and judges only when they were built with this build's settings."""
    from common.toy.build import BuildConfig, build

    with pytest.raises(ValueError, match=r"--reuse .*differs in .*vae_steps=2400 \(here 2\)"):
        build(tmp_path, BuildConfig.quick(), reuse=REPO / "data" / "toy")
    assert not (tmp_path / "manifest.json").exists()
