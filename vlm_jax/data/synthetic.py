"""Procedural image-caption data: coloured shapes on a background, with captions.

Record i is a pure function of (seed, i): any subset is cheap to produce and nested, and
the data set has any size. `caption_noise` replaces that fraction of captions (chosen by
(seed, i)) with a wrong caption (the description of another random scene) or a generic
one, so clean vs noisy data mimics CC12M vs LAION-400M for the data-quality study.

Generation is vectorised over a batch of record indices (`make_batch`): the random draws
of record i are a counter-based hash of (seed, stream, i, draw) (`uniforms`), so a batch
costs a few numpy calls whatever its size, and record i is the same alone or in any batch
(`make_record(seed, i)` is row 0 of `make_batch(seed, [i])`). Shapes are stamped from
cached sprite offsets, one vectorised assignment per shape slot (group, instance) for the
whole batch, in the order a painter would draw them (later shapes cover earlier ones).

Captions only use the words in `VOCAB`, so the word-level "synthetic" tokenizer
(`tokenizer.SyntheticTokenizer`) covers them without unknown tokens.

`GENERATOR_VERSION` names the record function: caches of anything derived from the
records (the frozen-feature cache) must key on it.
"""
from __future__ import annotations

import dataclasses
import functools

import numpy as np

# 2: counter-hash draws, vectorised batches (1: per-record Mersenne Twister).
GENERATOR_VERSION = 2

COLOURS = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 220),
    "yellow": (235, 215, 50), "purple": (140, 60, 180), "orange": (240, 140, 30),
    "white": (245, 245, 245), "black": (20, 20, 20),
}
BACKGROUNDS = {"gray": (128, 128, 128), "brown": (120, 85, 50), "pink": (240, 170, 190),
               "cyan": (90, 200, 210)}
SHAPES = ("circle", "square", "triangle")
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles"}
NUMBERS = ("one", "two", "three", "four")
PLACES = {(0, 0): "top left", (0, 1): "top", (0, 2): "top right", (1, 0): "left",
          (1, 1): "middle", (1, 2): "right", (2, 0): "bottom left", (2, 1): "bottom",
          (2, 2): "bottom right"}
SIZES = ("small", "big")
GENERIC = ("a picture", "an image of something", "a photo", "a nice picture of things",
           "image", "a photo of some shapes")
MAX_GROUPS, MAX_COUNT = 2, 3

# Every word a caption (or a chat template) can use.
_TEMPLATE_WORDS = ("user", "assistant", "describe", "the", "image", ".", ":", "\n", "?",
                   ",", "what", "is", "in")
_CAPTION_WORDS = ("a", "an", "of", "on", "and", "at", "with", "background", "photo",
                  "picture", "something", "nice", "things", "some", "shapes", "image")
_COLOUR_NAMES = tuple(COLOURS)
_BACKGROUND_NAMES = tuple(BACKGROUNDS)
_PLACE_LIST = tuple(PLACES)
VOCAB = tuple(dict.fromkeys(
    _TEMPLATE_WORDS + _CAPTION_WORDS + tuple(COLOURS) + tuple(BACKGROUNDS) + SHAPES
    + tuple(PLURAL.values()) + NUMBERS + SIZES
    + tuple(w for p in PLACES.values() for w in p.split())))

# Random streams of a record: its scene, its caption noise, the scene a wrong caption
# describes.
SCENE, NOISE, OTHER = 1, 2, 3


@dataclasses.dataclass(frozen=True)
class Group:
    """`count` shapes of one kind and colour around one place of a 3x3 grid."""
    shape: str
    colour: str
    count: int
    place: tuple[int, int]
    big: bool


@dataclasses.dataclass(frozen=True)
class Scene:
    background: str
    groups: tuple[Group, ...]


# ----------------------------------------------------------------------------- draws
_U64 = np.uint64
_GOLDEN = _U64(0x9E3779B97F4A7C15)
_M1, _M2 = _U64(0xBF58476D1CE4E5B9), _U64(0x94D049BB133111EB)
_MASK64 = (1 << 64) - 1


def _mix(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: a bijection of uint64 with full avalanche."""
    x = x ^ (x >> _U64(30))
    x = x * _M1
    x = x ^ (x >> _U64(27))
    x = x * _M2
    return x ^ (x >> _U64(31))


def uniforms(seed: int, indices, stream: int, k: int) -> np.ndarray:
    """float64 [n, k] in [0, 1): draw d of record indices[r] in `stream`, a pure function
    of (seed, stream, index, d) (53 bits of a counter hash; platform independent)."""
    idx = np.asarray(indices, np.int64).reshape(-1).astype(np.uint64)
    h = _mix(idx ^ _stream_key(int(seed) & _MASK64, int(stream)))
    x = _mix(h[:, None] + _draw_offsets(k))
    return (x >> _U64(11)).astype(np.float64) * (1.0 / (1 << 53))


@functools.lru_cache(maxsize=64)
def _stream_key(seed: int, stream: int) -> np.uint64:
    return _mix(np.array([seed], np.uint64)
                ^ np.array([(stream * int(_GOLDEN)) & _MASK64], np.uint64))[0]


@functools.lru_cache(maxsize=16)
def _draw_offsets(k: int) -> np.ndarray:
    out = np.arange(1, k + 1, dtype=np.uint64)[None, :] * _GOLDEN
    out.flags.writeable = False
    return out


def _below(u: np.ndarray, n) -> np.ndarray:
    """Uniform integers in [0, n) from uniforms in [0, 1) (n broadcasts)."""
    return np.minimum((u * n).astype(np.int64), np.asarray(n) - 1)


@dataclasses.dataclass(frozen=True)
class Scenes:
    """A batch of scenes as arrays (row r = one record): `groups` [n] in {1, 2}; per
    group slot [n, 2]: `place` (index into PLACES), `shape`, `colour`, `count` (1-3),
    `big`; `background` [n]; `jitter` [n, 2, 3, 2]: each shape's offset from its place
    centre in cells (y, x), in [-0.25, 0.25). Slots past `groups` hold unused draws."""
    groups: np.ndarray
    place: np.ndarray
    shape: np.ndarray
    colour: np.ndarray
    count: np.ndarray
    big: np.ndarray
    background: np.ndarray
    jitter: np.ndarray

    def __len__(self) -> int:
        return len(self.groups)

    def scene(self, r: int) -> Scene:
        """Row r as a `Scene`."""
        return Scene(background=_BACKGROUND_NAMES[self.background[r]], groups=tuple(
            Group(shape=SHAPES[self.shape[r, g]], colour=_COLOUR_NAMES[self.colour[r, g]],
                  count=int(self.count[r, g]), place=_PLACE_LIST[self.place[r, g]],
                  big=bool(self.big[r, g]))
            for g in range(int(self.groups[r]))))

    def same(self, other: "Scenes") -> np.ndarray:
        """bool [n]: row r of both describes the same scene (equal captions)."""
        used = np.arange(MAX_GROUPS)[None, :] < self.groups[:, None]
        eq = ((self.place == other.place) & (self.shape == other.shape)
              & (self.colour == other.colour) & (self.count == other.count)
              & (self.big == other.big))
        return ((self.groups == other.groups) & (self.background == other.background)
                & (eq | ~used).all(1))


# Draws of a scene: two groups?, two places, per group (shape, colour, count, big), the
# background (integers below these ranges), then the jitters (floats).
_SCENE_RANGES = np.asarray([2, len(PLACES), len(PLACES) - 1]
                           + [len(SHAPES), len(COLOURS), MAX_COUNT, 2] * MAX_GROUPS
                           + [len(BACKGROUNDS)], np.int64)
_SCENE_DRAWS = len(_SCENE_RANGES) + 2 * MAX_GROUPS * MAX_COUNT


def sample_scenes(seed: int, indices, stream: int = SCENE) -> Scenes:
    """The scenes of records `indices`: one or two groups of shapes in distinct places."""
    u = uniforms(seed, indices, stream, _SCENE_DRAWS)
    n, k = len(u), len(_SCENE_RANGES)
    ints = _below(u[:, :k], _SCENE_RANGES)
    first, second = ints[:, 1], ints[:, 2]
    g = ints[:, 3:k - 1].reshape(n, MAX_GROUPS, 4)
    return Scenes(groups=1 + (ints[:, 0] == 0), place=np.stack(
                      [first, second + (second >= first)], 1),  # distinct, uniform
                  shape=g[..., 0], colour=g[..., 1], count=1 + g[..., 2], big=g[..., 3] == 0,
                  background=ints[:, k - 1],
                  jitter=(u[:, k:].reshape(n, MAX_GROUPS, MAX_COUNT, 2) - 0.5) / 2)


def scene_of(seed: int, index: int) -> Scene:
    """The scene of record `index` (what its image shows and its clean caption says)."""
    return sample_scenes(seed, [index]).scene(0)


# ----------------------------------------------------------------------------- captions
def _phrase(shape: str, colour: str, count: int, place, big: bool) -> str:
    noun = shape if count == 1 else PLURAL[shape]
    size = "big" if big else "small"
    return f"{NUMBERS[count - 1]} {size} {colour} {noun} at the {PLACES[place]}"


def describe(scene: Scene) -> str:
    """The true caption of a scene, e.g. "two small red circles at the top left and one
    big blue square at the right on a gray background"."""
    parts = [_phrase(g.shape, g.colour, g.count, g.place, g.big) for g in scene.groups]
    return " and ".join(parts) + f" on a {scene.background} background"


@functools.lru_cache(maxsize=1)
def _phrases() -> np.ndarray:
    """Object array [place, shape, colour, count - 1, big] of group phrases."""
    out = np.empty((len(PLACES), len(SHAPES), len(COLOURS), MAX_COUNT, 2), object)
    for idx in np.ndindex(out.shape):
        p, s, c, k, b = idx
        out[idx] = _phrase(SHAPES[s], _COLOUR_NAMES[c], k + 1, _PLACE_LIST[p], bool(b))
    return out


_SUFFIX = tuple(f" on a {b} background" for b in _BACKGROUND_NAMES)


def describe_all(scenes: Scenes, rows=None) -> list[str]:
    """`describe` of each scene (of `rows` only, when given), from cached phrases."""
    rows = np.arange(len(scenes)) if rows is None else np.asarray(rows, np.int64)
    ph = _phrases()[scenes.place[rows], scenes.shape[rows], scenes.colour[rows],
                    scenes.count[rows] - 1, scenes.big[rows].astype(np.int64)]
    return [(a + " and " + b if g == 2 else a) + _SUFFIX[bg] for a, b, g, bg in
            zip(ph[:, 0].tolist(), ph[:, 1].tolist(), scenes.groups[rows].tolist(),
                scenes.background[rows].tolist())]


def captions(seed: int, indices, scenes: Scenes,
             caption_noise: float = 0.0) -> tuple[list[str], np.ndarray]:
    """(captions, clean [n] bool) of records `indices` with scenes `scenes`: a fraction
    `caption_noise` (by (seed, index)) is wrong: half generic phrases, half the caption
    of another random scene (a generic phrase if that happens to be the same caption)."""
    texts = describe_all(scenes)
    if caption_noise <= 0:
        return texts, np.ones((len(texts),), bool)
    u = uniforms(seed, indices, NOISE, 3)
    noisy = u[:, 0] < caption_noise
    generic = noisy & (u[:, 1] < 0.5)
    wrong = np.flatnonzero(noisy & ~generic)
    other = sample_scenes(seed, indices, OTHER)
    same = other.same(scenes)
    for r in np.flatnonzero(generic):
        texts[r] = GENERIC[_below(u[r, 2], len(GENERIC))]
    for r, text in zip(wrong.tolist(), describe_all(other, wrong)):
        texts[r] = GENERIC[0] if same[r] else text
    return texts, ~noisy


def caption_of(seed: int, index: int, caption_noise: float = 0.0) -> tuple[str, bool]:
    """Caption of record `index` and whether it is clean (the scene's true description)."""
    return _caption_one(seed, index, _scene_one(seed, index), caption_noise)


# ----------------------------------------------------------------------------- images
@functools.lru_cache(maxsize=256)
def _sprite(shape: str, r: float) -> np.ndarray:
    """Boolean mask of a shape of radius r centred in a (2k+1)^2 box, k = ceil(r)."""
    k = int(np.ceil(r))
    d = np.arange(-k, k + 1, dtype=np.float32)
    yy, xx = d[:, None], d[None, :]
    if shape == "circle":
        return yy ** 2 + xx ** 2 <= r * r
    if shape == "square":
        return (np.abs(yy) <= r) & (np.abs(xx) <= r)
    # Upward triangle with apex at (-r, 0) and base at +r.
    t = (yy + r) / (2 * r)
    return (t >= 0) & (t <= 1) & (np.abs(xx) <= t * r)


_COLOUR_RGB = np.asarray(list(COLOURS.values()), np.uint8)


@functools.lru_cache(maxsize=32)
def _sprites(size: int) -> tuple[int, np.ndarray, np.ndarray]:
    """(k, keep, paint): every sprite at image size `size` centred in one (2k+1)^2 box,
    as uint8 [shape, big, 2k+1, 2k+1, 3] `keep` (0 inside the shape, 255 outside) and
    [colour, shape, big, 2k+1, 2k+1, 3] `paint` (the colour inside, 0 outside): painting
    a box is `box & keep | paint` (read-only)."""
    cell = size / 3.0
    masks = [[_sprite(s, round(cell * (0.22 if big else 0.13), 2)) for big in (0, 1)]
             for s in SHAPES]
    k = max(m.shape[0] // 2 for row in masks for m in row)
    inside = np.zeros((len(SHAPES), 2, 2 * k + 1, 2 * k + 1, 1), bool)
    for s, row in enumerate(masks):
        for b, m in enumerate(row):
            h = m.shape[0] // 2
            inside[s, b, k - h:k + h + 1, k - h:k + h + 1, 0] = m
    keep = np.where(inside, np.uint8(0), np.uint8(255)).repeat(3, -1)
    paint = np.where(inside[None], _COLOUR_RGB[:, None, None, None, None, :], np.uint8(0))
    for a in (keep, paint):
        a.flags.writeable = False
    return k, keep, paint


@functools.lru_cache(maxsize=32)
def _canvases(size: int, pad: int) -> np.ndarray:
    """uint8 [background, size + 2 pad, size + 2 pad, 3]: empty canvases (read-only)."""
    out = np.empty((len(BACKGROUNDS), size + 2 * pad, size + 2 * pad, 3), np.uint8)
    for b, rgb in enumerate(BACKGROUNDS.values()):
        out[b] = rgb
    out.flags.writeable = False
    return out


def render_batch(scenes: Scenes, size: int) -> np.ndarray:
    """Draws the scenes as uint8 [n, size, size, 3] images: shapes centred on pixels and
    clipped at the borders, painted slot by slot (group, instance) in drawing order.

    Each slot is four numpy calls for the whole batch: on a canvas padded by the sprite
    half-width k, the (2k+1)^2 box of every image's shape is one element of a writable
    strided view [n, size, size, 2k+1, 2k+1, 3] (the box centred on each pixel); the
    boxes of one slot lie in different images, so they are gathered, painted with
    bitwise ops against cached sprite arrays (no broadcasting over small axes, which
    numpy runs slowly) and scattered back at once."""
    n = len(scenes)
    k, keep, paint = _sprites(size)
    w = 2 * k + 1
    canvas = _canvases(size, k)[scenes.background]  # a gather: a new, writable array
    sn, sy, sx, sc = canvas.strides
    boxes = np.lib.stride_tricks.as_strided(canvas, (n, size, size, w, w, 3),
                                            (sn, sy, sx, sy, sx, sc), writeable=True)
    # Every live shape at once, ordered by slot (group, instance), then image.
    live = ((np.arange(MAX_GROUPS)[:, None, None] < scenes.groups)
            & (np.arange(MAX_COUNT)[None, :, None] < scenes.count.T[:, None, :]))
    g, j, rows = np.nonzero(live)
    place = np.asarray(_PLACE_LIST, np.int64)[scenes.place[rows, g]]
    # Centres as int() of the jittered position (positive: truncation = floor) [L, 2].
    centre = ((place + 0.5 + scenes.jitter[rows, g, j]) * (size / 3.0)).astype(np.int64)
    sprite = (scenes.shape[rows, g], scenes.big[rows, g].astype(np.int64))
    keeps, paints = keep[sprite], paint[(scenes.colour[rows, g],) + sprite]
    ends = np.cumsum(live.reshape(MAX_GROUPS * MAX_COUNT, n).sum(1)).tolist()
    for a, b in zip([0] + ends[:-1], ends):
        if a == b:
            continue
        at = (rows[a:b], centre[a:b, 0], centre[a:b, 1])
        box = boxes[at]
        box &= keeps[a:b]
        box |= paints[a:b]
        boxes[at] = box
    return np.ascontiguousarray(canvas[:, k:k + size, k:k + size])


# ----------------------------------------------------------------------------- records
def make_batch(seed: int, indices, size: int = 64, caption_noise: float = 0.0,
               with_image: bool = True) -> dict:
    """Records `indices` stacked: {"image": uint8 [n, size, size, 3] (with_image), "text":
    [n] str, "key": [n] str, "source": [n] str, "clean": bool [n]}.

    The images depend only on (seed, index), never on `caption_noise`."""
    idx = np.asarray(indices, np.int64).reshape(-1)
    scenes = sample_scenes(seed, idx)
    texts, clean = captions(seed, idx, scenes, caption_noise)
    out = {"text": texts, "key": list(map("{:012d}".format, idx.tolist())),
           "source": [f"synthetic:{seed}"] * len(idx), "clean": clean}
    if with_image:
        out["image"] = render_batch(scenes, size)
    return out


# ----------------------------------------------------------------------------- one record
# The same function for a single record in plain Python (numpy's per-call overhead would
# dominate a batch of one): the same draws (`_draws_one` = a row of `uniforms`), scene,
# caption and painting; tests check it equals `make_batch` record for record.
_M1_INT, _M2_INT, _GOLDEN_INT = int(_M1), int(_M2), int(_GOLDEN)
_RANGES = tuple(int(r) for r in _SCENE_RANGES)


def _mix_int(x: int) -> int:
    x ^= x >> 30
    x = (x * _M1_INT) & _MASK64
    x ^= x >> 27
    x = (x * _M2_INT) & _MASK64
    return x ^ (x >> 31)


def _draws_one(seed: int, index: int, stream: int, draws) -> list[float]:
    """Draws `draws` (indices d, or a count k for 0..k-1) of record `index`: the row of
    `uniforms(seed, [index], stream, k)`."""
    h = _mix_int((int(index) & _MASK64) ^ int(_stream_key(int(seed) & _MASK64, int(stream))))
    m, m1, m2, out = _MASK64, _M1_INT, _M2_INT, []
    for d in (range(draws) if isinstance(draws, int) else draws):
        x = (h + (d + 1) * _GOLDEN_INT) & m  # _mix_int, inlined (the hot loop)
        x ^= x >> 30
        x = (x * m1) & m
        x ^= x >> 27
        x = (x * m2) & m
        out.append(((x ^ (x >> 31)) >> 11) * (1.0 / (1 << 53)))
    return out


@dataclasses.dataclass(frozen=True)
class _One:
    """One record's scene as `Scenes` holds it, in Python scalars: per group (place
    index, shape, colour, count, big); the (dy, dx) jitter of each drawn shape in
    drawing order (None where not needed)."""
    groups: tuple[tuple[int, int, int, int, bool], ...]
    background: int
    jitter: tuple[float, ...] | None


def _scene_one(seed: int, index: int, stream: int = SCENE, jitter: bool = True) -> _One:
    n = len(_RANGES)
    i = [min(int(x * r), r - 1) for x, r in zip(_draws_one(seed, index, stream, n), _RANGES)]
    places = (i[1], i[2] + (i[2] >= i[1]))
    groups = tuple((places[g], i[3 + 4 * g], i[4 + 4 * g], 1 + i[5 + 4 * g], i[6 + 4 * g] == 0)
                   for g in range(1 + (i[0] == 0)))
    jit = None
    if jitter:  # only the draws of the shapes drawn (column n + 2 (g C + j) + yx)
        cols = [n + 2 * (g * MAX_COUNT + j) + yx for g, grp in enumerate(groups)
                for j in range(grp[3]) for yx in (0, 1)]
        jit = tuple((x - 0.5) / 2 for x in _draws_one(seed, index, stream, cols))
    return _One(groups, i[n - 1], jit)


def _describe_one(scene: _One) -> str:
    ph = _phrases()
    return " and ".join(ph[p, s, c, k - 1, int(b)] for p, s, c, k, b in scene.groups
                        ) + _SUFFIX[scene.background]


def _caption_one(seed: int, index: int, scene: _One,
                 caption_noise: float) -> tuple[str, bool]:
    if caption_noise <= 0:
        return _describe_one(scene), True
    u = _draws_one(seed, index, NOISE, 3)
    if u[0] >= caption_noise:
        return _describe_one(scene), True
    if u[1] < 0.5:
        return GENERIC[min(int(u[2] * len(GENERIC)), len(GENERIC) - 1)], False
    other = _scene_one(seed, index, OTHER, jitter=False)
    same = (other.groups, other.background) == (scene.groups, scene.background)
    return (GENERIC[0] if same else _describe_one(other)), False


def _render_one(scene: _One, size: int) -> np.ndarray:
    k, keep, paint = _sprites(size)
    w = 2 * k + 1
    canvas = _canvases(size, k)[scene.background].copy()
    cell = size / 3.0
    jitter = iter(scene.jitter)
    for p, shape, colour, count, big in scene.groups:
        row, col = _PLACE_LIST[p]
        keep_s, paint_s = keep[shape, int(big)], paint[colour, shape, int(big)]
        for _ in range(count):
            cy, cx = int((row + 0.5 + next(jitter)) * cell), int((col + 0.5 + next(jitter)) * cell)
            box = canvas[cy:cy + w, cx:cx + w]  # centred on (cy, cx) of the image
            box &= keep_s
            box |= paint_s
    return np.ascontiguousarray(canvas[k:k + size, k:k + size])


def make_record(seed: int, index: int, size: int = 64, caption_noise: float = 0.0,
                with_image: bool = True) -> dict:
    """Sample `index`: {"image": uint8 [size,size,3], "text", "key", "source", "clean"}
    (equal to row 0 of `make_batch(seed, [index])`, computed without array calls)."""
    scene = _scene_one(seed, index)
    text, clean = _caption_one(seed, index, scene, caption_noise)
    rec = {"text": text, "key": f"{int(index):012d}", "source": f"synthetic:{seed}",
           "clean": clean}
    if with_image:
        rec["image"] = _render_one(scene, size)
    return rec
