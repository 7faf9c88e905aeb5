"""The toy world: seeded, procedurally drawn 32x32 cartoon people with deliberately biased occupations.

An occupation is "{field} {role}". The field word sets the background colour and carries the gender-like and age-like
biases; the role word sets the clothes colour and carries the race-like bias. Attributes use the class orders of the
real presets (`common.attributes`):

- gender (female, male) -> hair length: a long frame of hair around the face (female) or a short cap (male); structural,
  so it survives the VAE's blur.
- race (WMELH, Black, Indian, Asian) -> four skin-tone families (pink-light, dark brown, mid brown, golden).
- age (young, old) -> hair colour: dark/brown/auburn (young) or grey-white (old).

Every field word appears in 14 training occupations, every role word likewise; the 32 held-out occupations are new
combinations of seen words, so a bias tied to a word (and an edit that removes it) can carry over to them.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import numpy as np

WORLD_VERSION = 1
IMAGE_SIZE = 32
PROMPT_TEMPLATE = "a photo of the face of a {occupation}, a person"
"""the evaluation prompt (the paper's template)"""

ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "gender": ("female", "male"),
    "race": ("WMELH", "Black", "Indian", "Asian"),
    "age": ("young", "old"),
}

# (word, background RGB). Even index: 88% long hair ("female"); odd index: 88% short hair ("male").
FIELDS: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("ocean", (52, 112, 214)),
    ("forest", (38, 138, 70)),
    ("desert", (150, 96, 200)),
    ("arctic", (232, 112, 172)),
    ("space", (36, 176, 176)),
    ("music", (150, 196, 56)),
    ("sports", (104, 104, 226)),
    ("medical", (196, 56, 78)),
    ("legal", (124, 208, 232)),
    ("farm", (30, 66, 128)),
    ("software", (88, 54, 140)),
    ("film", (176, 222, 152)),
    ("fashion", (204, 164, 232)),
    ("energy", (18, 116, 104)),
    ("transport", (146, 172, 222)),
    ("finance", (96, 168, 118)),
)
# (word, clothes RGB). Role j: skin family j % 4 is dominant (80%).
ROLES: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("engineer", (206, 40, 40)),
    ("manager", (240, 132, 30)),
    ("assistant", (240, 222, 50)),
    ("teacher", (46, 160, 50)),
    ("designer", (40, 70, 204)),
    ("analyst", (122, 48, 162)),
    ("inspector", (244, 244, 244)),
    ("technician", (28, 28, 28)),
    ("consultant", (128, 128, 128)),
    ("researcher", (122, 74, 38)),
    ("officer", (244, 150, 192)),
    ("clerk", (60, 204, 224)),
    ("planner", (20, 30, 92)),
    ("writer", (124, 124, 36)),
    ("director", (112, 18, 42)),
    ("trainer", (0, 130, 130)),
)
SKIN = np.array([(245, 194, 184), (96, 58, 38), (178, 116, 74), (232, 198, 112)], dtype=np.float32)
YOUNG_HAIR = np.array([(36, 30, 30), (98, 60, 34), (168, 64, 30)], dtype=np.float32)
OLD_HAIR = np.array((212, 212, 220), dtype=np.float32)

GENDER_MAJORITY = 0.88
RACE_MAJORITY = 0.8
OLD_SHARE = (0.10, 0.25, 0.40, 0.55)
HELDOUT_OFFSETS = (5, 11)
"""held-out occupation = (field f, role (f + k) mod 16) for k in these offsets: each word is held out exactly twice"""

TEMPLATES = (
    PROMPT_TEMPLATE,
    PROMPT_TEMPLATE,
    PROMPT_TEMPLATE,
    "a photo of a {occupation}",
    "a portrait of a {occupation}, a person",
    "the face of a {occupation}",
    "a {occupation}",
    "{occupation}",
    "a picture of the face of a {occupation}",
    "a close-up photo of a {occupation}, a person",
)
GENDER_WORDS = ("long-haired", "short-haired")
RACE_WORDS = ("light-skinned", "dark-skinned", "brown-skinned", "golden-skinned")
AGE_WORDS = ("young", "old")
MENTION_RATE = {"gender": 0.3, "race": 0.3, "age": 0.3}
"""each attribute is named in a caption with this probability (gives a text-encoder LoRA directions to move along)"""
COUNTER_MENTION_RATE = {"gender": 0.9, "race": 0.3, "age": 0.3}
"""reporting bias: an attribute whose class is not its occupation's most likely one ("a short-haired ocean engineer")
is named with this probability instead. At 0.3 for hair length too, a build never learned the hair words (at guidance
4, "long-haired" / "short-haired" in front of 8 held-out occupations moved the share of long hair by at most 0.19, as
often the wrong way: the field word explains 88% of it and only 3.6% of captions named a hair length against it);
the skin words, at 0.3, were learned. At 0.9 the hair words give the named hair in 91-100% of images"""


@dataclass
class People:
    """A batch of N people: attributes, occupation words and every per-person drawing parameter (arrays of length N).

    `gender`, `race`, `age` are class indices in the preset orders; `field`, `role` index FIELDS and ROLES.
    """

    gender: np.ndarray
    race: np.ndarray
    age: np.ndarray
    field: np.ndarray
    role: np.ndarray
    cx: np.ndarray
    cy: np.ndarray
    rx: np.ndarray
    ry: np.ndarray
    shape_p: np.ndarray
    skin_jit: np.ndarray  # [N, 3]
    hair_kind: np.ndarray  # young hair colour index
    hair_jit: np.ndarray  # [N, 3]
    cap_depth: np.ndarray
    cap_tilt: np.ndarray
    back_w: np.ndarray
    back_len: np.ndarray
    body_w: np.ndarray
    body_h: np.ndarray
    cloth_jit: np.ndarray  # [N, 3]
    bg_jit: np.ndarray  # [N, 3]
    bg_grad: np.ndarray
    eye_dx: np.ndarray
    eye_dy: np.ndarray
    eye_r: np.ndarray
    eye_col: np.ndarray  # [N, 3]
    mouth_w: np.ndarray
    mouth_h: np.ndarray
    mouth_dy: np.ndarray
    mouth_col: np.ndarray  # [N, 3]
    glasses: np.ndarray  # bool

    def __len__(self) -> int:
        return len(self.gender)

    def take(self, idx) -> People:
        """The people at `idx` (index array or slice)."""
        return People(**{f.name: getattr(self, f.name)[idx] for f in fields(self)})

    def with_attributes(self, gender=None, race=None, age=None) -> People:
        """The same people (same scene, pose and face) with some attributes replaced (arrays or scalars)."""
        n = len(self)
        upd = {k: np.broadcast_to(np.asarray(v), (n,)).copy() for k, v in (("gender", gender), ("race", race), ("age", age))
               if v is not None}
        return replace(self, **upd)


class ToyWorld:
    """The world's fixed design (words, colours, biases, splits) and its samplers. Deterministic given the rng."""

    version = WORLD_VERSION
    image_size = IMAGE_SIZE
    template = PROMPT_TEMPLATE
    attributes = ATTRIBUTES

    def __init__(self):
        self.fields = tuple(w for w, _ in FIELDS)
        self.roles = tuple(w for w, _ in ROLES)
        self.field_colors = np.array([c for _, c in FIELDS], dtype=np.float32)
        self.role_colors = np.array([c for _, c in ROLES], dtype=np.float32)
        nf, nr = len(self.fields), len(self.roles)
        held = {(f, (f + k) % nr) for f in range(nf) for k in HELDOUT_OFFSETS}
        pairs = [(f, r) for f in range(nf) for r in range(nr)]
        self.train_pairs = [p for p in pairs if p not in held]
        self.heldout_pairs = [p for p in pairs if p in held]
        # [fields, roles, 3]: each occupation's most likely gender, race and age class (from `distributions`)
        self._majority = np.array([[[int(np.argmax(d[a])) for a in ATTRIBUTES] for d in
                                    (self.distributions(f, r) for r in range(nr))] for f in range(nf)], dtype=np.int64)

    # ---- design ----------------------------------------------------------------------------------------------
    def occupation(self, field: int, role: int) -> str:
        return f"{self.fields[field]} {self.roles[role]}"

    @property
    def train_occupations(self) -> list[str]:
        """224 occupations seen in training (14 per field word, 14 per role word)."""
        return [self.occupation(f, r) for f, r in self.train_pairs]

    @property
    def heldout_occupations(self) -> list[str]:
        """32 unseen combinations of seen words (2 per field word, 2 per role word)."""
        return [self.occupation(f, r) for f, r in self.heldout_pairs]

    def train_subset(self, per_word: int = 2) -> list[str]:
        """A balanced subset of the training occupations: (field f, role (f + k) mod 16) for the first `per_word`
        offsets k that are not held out, so every field and every role word appears `per_word` times."""
        nr = len(self.roles)
        offsets = [k for k in range(nr) if k not in HELDOUT_OFFSETS][:per_word]
        return [self.occupation(f, (f + k) % nr) for k in offsets for f in range(len(self.fields))]

    def parse(self, occupation: str) -> tuple[int, int]:
        """(field index, role index) of "{field} {role}"."""
        parts = occupation.split()
        if len(parts) != 2 or parts[0] not in self.fields or parts[1] not in self.roles:
            raise ValueError(
                f"'{occupation}' is not a toy occupation: expected '{{field}} {{role}}' with field in {list(self.fields)} "
                f"and role in {list(self.roles)}"
            )
        return self.fields.index(parts[0]), self.roles.index(parts[1])

    def prompt(self, occupation: str) -> str:
        """The evaluation prompt of an occupation."""
        return self.template.format(occupation=occupation)

    def distributions(self, field: int, role: int) -> dict[str, np.ndarray]:
        """The designed class distribution of each attribute for one occupation."""
        g = GENDER_MAJORITY if field % 2 == 0 else 1 - GENDER_MAJORITY
        race = np.full(4, (1 - RACE_MAJORITY) / 3)
        race[role % 4] = RACE_MAJORITY
        old = OLD_SHARE[(field // 2) % 4]
        return {"gender": np.array([g, 1 - g]), "race": race, "age": np.array([1 - old, old])}

    def majority(self, field, role) -> np.ndarray:
        """The occupation's most likely class of each attribute (gender, race, age) for index arrays `field`, `role`
        of any (equal) shape: int64 [..., 3]."""
        return self._majority[np.asarray(field), np.asarray(role)]

    # ---- sampling --------------------------------------------------------------------------------------------
    def sample_people(self, rng: np.random.Generator, n: int, pairs: list[tuple[int, int]] | None = None) -> People:
        """n people of occupations drawn uniformly from `pairs` (default: the training pairs), attributes drawn from
        the occupation's designed distributions, every drawing parameter random."""
        pairs = self.train_pairs if pairs is None else pairs
        pick = rng.integers(0, len(pairs), n)
        field = np.array([pairs[i][0] for i in pick], dtype=np.int64)
        role = np.array([pairs[i][1] for i in pick], dtype=np.int64)
        gender = np.empty(n, np.int64)
        race = np.empty(n, np.int64)
        age = np.empty(n, np.int64)
        u = rng.random((n, 3))
        for i in range(n):
            d = self.distributions(field[i], role[i])
            gender[i] = int(u[i, 0] >= d["gender"][0])
            race[i] = min(int(np.searchsorted(np.cumsum(d["race"]), u[i, 1], side="right")), 3)
            age[i] = int(u[i, 2] >= d["age"][0])
        return self.draw(rng, gender, race, age, field, role)

    def sample_balanced(self, rng: np.random.Generator, n: int, pairs: list[tuple[int, int]] | None = None) -> People:
        """n people with attributes drawn uniformly and independently of the occupation (unbiased data for the
        judges and the VAE); occupations uniform over `pairs` (default: all 256 combinations)."""
        pairs = self.train_pairs + self.heldout_pairs if pairs is None else pairs
        pick = rng.integers(0, len(pairs), n)
        field = np.array([pairs[i][0] for i in pick], dtype=np.int64)
        role = np.array([pairs[i][1] for i in pick], dtype=np.int64)
        return self.draw(rng, rng.integers(0, 2, n), rng.integers(0, 4, n), rng.integers(0, 2, n), field, role)

    def draw(self, rng: np.random.Generator, gender, race, age, field, role) -> People:
        """People with the given attributes and occupation words (arrays of length N) and random drawing parameters."""
        gender, race, age, field, role = (np.asarray(a, dtype=np.int64).reshape(-1) for a in (gender, race, age, field, role))
        n = len(gender)
        u = lambda lo, hi, *shape: rng.uniform(lo, hi, (n, *shape)).astype(np.float32)  # noqa: E731
        return People(
            gender=gender, race=race, age=age, field=field, role=role,
            cx=u(14.6, 17.4), cy=u(12.4, 14.6), rx=u(5.6, 6.8), ry=u(6.8, 8.0), shape_p=u(1.8, 2.7),
            skin_jit=u(-9, 9, 3), hair_kind=rng.integers(0, len(YOUNG_HAIR), n), hair_jit=u(-12, 12, 3),
            cap_depth=u(0.12, 0.42), cap_tilt=u(-0.25, 0.25), back_w=u(1.8, 2.8), back_len=u(2.5, 6.0),
            body_w=u(10.0, 12.5), body_h=u(7.0, 9.0), cloth_jit=u(-10, 10, 3), bg_jit=u(-10, 10, 3),
            bg_grad=u(-0.1, 0.1), eye_dx=u(2.0, 2.8), eye_dy=u(-0.8, 0.4), eye_r=u(0.65, 0.95),
            eye_col=np.where(rng.random((n, 1)) < 0.8, [[30, 22, 20]], [[40, 80, 150]]).astype(np.float32),
            mouth_w=u(1.0, 2.2), mouth_h=u(0.35, 0.6), mouth_dy=u(0.4, 0.58),
            mouth_col=(np.array([[150, 44, 52]]) + rng.uniform(-20, 20, (n, 3))).astype(np.float32),
            glasses=rng.random(n) < 0.15,
        )

    def captions(self, rng: np.random.Generator, people: People, mention_rate: dict[str, float] | None = None,
                 counter_rate: dict[str, float] | None = None) -> list[str]:
        """A varied training caption per person: a template around "{field} {role}"; each attribute is named with
        probability `mention_rate[attribute]` (default `MENTION_RATE`) by an adjective IN FRONT of the occupation
        ("a young short-haired dark-skinned ocean engineer"). In front, because the text encoder is causal: only then
        do the occupation words' hidden states carry the attribute, so the U-Net learns to read it where a
        text-encoder LoRA can later move it. (Named after the occupation, "... with short hair", the words were
        never learned: the causal encoder keeps them out of the occupation tokens and the U-Net ignored them.)
        An attribute against its occupation's majority is named with probability `counter_rate[attribute]` (default
        `COUNTER_MENTION_RATE`) instead: captions mention what is unusual more often (reporting bias)."""
        out = []
        n = len(people)
        t = rng.integers(0, len(TEMPLATES), n)
        for name, given in (("mention_rate", mention_rate), ("counter_rate", counter_rate)):
            unknown = sorted(set(given or {}) - set(MENTION_RATE))
            if unknown:
                raise ValueError(f"{name}: unknown attribute(s) {unknown}; expected keys among {list(MENTION_RATE)}")
        rate = {**MENTION_RATE, **(mention_rate or {})}
        counter = {**COUNTER_MENTION_RATE, **(counter_rate or {})}
        names = tuple(ATTRIBUTES)  # gender, race, age
        classes = np.stack([people.gender, people.race, people.age], axis=1)
        p = np.where(classes == self.majority(people.field, people.role), [[rate[a] for a in names]],
                     [[counter[a] for a in names]])
        m = rng.random((n, 3)) < p
        for i in range(n):
            words = [AGE_WORDS[people.age[i]]] if m[i, 2] else []
            if m[i, 0]:
                words.append(GENDER_WORDS[people.gender[i]])
            if m[i, 1]:
                words.append(RACE_WORDS[people.race[i]])
            occ = " ".join([*words, self.occupation(people.field[i], people.role[i])])
            out.append(TEMPLATES[t[i]].format(occupation=occ))
        return out

    # ---- rendering -------------------------------------------------------------------------------------------
    def render(self, people: People, chunk: int = 1024) -> np.ndarray:
        """uint8 images [N, 32, 32, 3] of the people."""
        outs = [self._render_chunk(people.take(slice(s, s + chunk))) for s in range(0, len(people), chunk)]
        return np.concatenate(outs) if outs else np.zeros((0, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)

    def _render_chunk(self, p: People) -> np.ndarray:
        """Shapes are signed distances in pixels (negative inside); coverage clip(0.5 - d, 0, 1) anti-aliases the
        edges, and layers are composited back to front."""
        n = len(p)
        g = np.arange(IMAGE_SIZE, dtype=np.float32) + 0.5
        Y, X = g[None, :, None], g[None, None, :]
        col = lambda a: np.asarray(a, dtype=np.float32).reshape(n, 1, 1)  # noqa: E731
        cx, cy, rx, ry = col(p.cx), col(p.cy), col(p.rx), col(p.ry)
        dx, dy = X - cx, Y - cy

        hair = np.where((p.age == 1)[:, None], OLD_HAIR[None], YOUNG_HAIR[p.hair_kind]) + p.hair_jit
        skin = SKIN[p.race] + p.skin_jit
        dark = np.full((n, 3), 25, np.float32)
        shade = 1 + col(p.bg_grad) * ((Y - 16) / 16)  # vertical background gradient
        img = (self.field_colors[p.field] + p.bg_jit)[:, None, None, :] * shade[..., None]

        def over(dist, rgb, on=None):
            a = np.clip(0.5 - dist, 0.0, 1.0)
            if on is not None:
                a = a * col(on)
            a = a[..., None]
            return img * (1 - a) + rgb[:, None, None, :] * a

        top = cy + ry + 1.8  # shoulder line
        bw, bh = col(p.body_w), col(p.body_h)
        img = over(_ellipse(dx, Y - top - bh, bw, bh), self.role_colors[p.role] + p.cloth_jit)
        wide = rx + col(p.back_w)
        back = np.minimum(
            _ellipse(dx, dy + 0.3, wide, ry + 1.6),
            np.maximum(np.abs(dx) - wide, np.maximum(-dy, dy - ry - col(p.back_len))),
        )
        img = over(back, hair, on=p.gender == 0)
        img = over(np.maximum(np.abs(dx) - rx * 0.38, np.maximum(-dy, Y - top - 1.0)), skin * 0.88)
        img = over(_ellipse(dx, dy, rx, ry, col(p.shape_p)), skin)
        cap_line = (dy + ry * col(p.cap_depth) - col(p.cap_tilt) * dx) / np.sqrt(1 + col(p.cap_tilt) ** 2)
        img = over(np.maximum(_ellipse(dx, dy, rx + 0.7, ry + 0.8), cap_line), hair)
        ey, ex, er = dy - col(p.eye_dy), col(p.eye_dx), col(p.eye_r)
        for s in (-1, 1):
            d = np.sqrt((dx - s * ex) ** 2 + ey**2)
            img = over(d - er, p.eye_col)
            img = over(np.abs(d - er - 0.9) - 0.3, dark, on=p.glasses)
        img = over(np.maximum(np.abs(dx) - 0.6, np.abs(ey) - 0.22), dark, on=p.glasses)
        img = over(_ellipse(dx, dy - ry * col(p.mouth_dy), col(p.mouth_w), col(p.mouth_h)), p.mouth_col)
        return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _ellipse(dx, dy, rx, ry, power=2.0):
    """Approximate signed distance (pixels) to the super-ellipse |dx/rx|^p + |dy/ry|^p = 1 (first-order: (q-1)/|grad q|)."""
    ux, uy = np.abs(dx / rx) + 1e-6, np.abs(dy / ry) + 1e-6
    s = ux**power + uy**power
    q = s ** (1 / power)
    k = q / s  # q^(1-p) = q / q^p
    gx, gy = k * ux ** (power - 1) / rx, k * uy ** (power - 1) / ry
    return (q - 1) / np.maximum(np.sqrt(gx**2 + gy**2), 1e-6)


def render(gender: int, race: int, age: int, field: str | int, role: str | int, rng: np.random.Generator) -> np.ndarray:
    """One person as a uint8 image [32, 32, 3]: attributes as class indices, occupation words as words or indices."""
    w = ToyWorld()
    f = w.fields.index(field) if isinstance(field, str) else int(field)
    r = w.roles.index(role) if isinstance(role, str) else int(role)
    return w.render(w.draw(rng, [gender], [race], [age], [f], [r]))[0]


def to_tensor(images: np.ndarray):
    """uint8 [N, H, W, 3] -> float tensor [N, 3, H, W] in [-1, 1]."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def to_uint8(images) -> np.ndarray:
    """float tensor [N, 3, H, W] in [-1, 1] -> uint8 [N, H, W, 3]."""
    import torch

    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def grid(images: np.ndarray, cols: int, scale: int = 1, pad: int = 1) -> np.ndarray:
    """Tile uint8 images [N, H, W, 3] into one uint8 image (white padding), each upscaled by `scale` (nearest)."""
    n, h, w, _ = images.shape
    if scale > 1:
        images = images.repeat(scale, axis=1).repeat(scale, axis=2)
        h, w = h * scale, w * scale
    rows = (n + cols - 1) // cols
    out = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, np.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        out[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = images[i]
    return out
