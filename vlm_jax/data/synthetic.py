"""Procedural image-caption data: coloured shapes on a background, with captions.

Record i is a pure function of (seed, i): any subset is cheap to produce and nested, and
the data set has any size. `caption_noise` replaces that fraction of captions (chosen by
(seed, i)) with a wrong caption (the description of another random scene) or a generic
one, so clean vs noisy data mimics CC12M vs LAION-400M for the data-quality study.

Captions only use the words in `VOCAB`, so the word-level "synthetic" tokenizer
(`tokenizer.synthetic_tokenizer`) covers them without unknown tokens.
"""
from __future__ import annotations

import dataclasses
import functools
import random

import numpy as np

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

# Every word a caption (or a chat template) can use.
_TEMPLATE_WORDS = ("user", "assistant", "describe", "the", "image", ".", ":", "\n", "?",
                   ",", "what", "is", "in")
_CAPTION_WORDS = ("a", "an", "of", "on", "and", "at", "with", "background", "photo",
                  "picture", "something", "nice", "things", "some", "shapes", "image")
_COLOUR_NAMES = tuple(COLOURS)
_BACKGROUND_NAMES = tuple(BACKGROUNDS)
VOCAB = tuple(dict.fromkeys(
    _TEMPLATE_WORDS + _CAPTION_WORDS + tuple(COLOURS) + tuple(BACKGROUNDS) + SHAPES
    + tuple(PLURAL.values()) + NUMBERS + SIZES
    + tuple(w for p in PLACES.values() for w in p.split())))


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


def _rng(seed: int, index: int, stream: int) -> random.Random:
    """The generator of (seed, index, stream): Python's Mersenne Twister seeded with one
    integer (deterministic across platforms and versions, and cheap to create)."""
    return random.Random(((int(seed) & 0xFFFFFFFF) << 72) | ((stream & 0xFF) << 64)
                         | (int(index) & 0xFFFFFFFFFFFFFFFF))


def sample_scene(rng: random.Random) -> Scene:
    """One or two groups of shapes in distinct places on a background."""
    n_groups = 1 + int(rng.random() < 0.5)
    places = rng.sample(list(PLACES), n_groups)
    groups = tuple(Group(shape=rng.choice(SHAPES), colour=rng.choice(_COLOUR_NAMES),
                         count=rng.randint(1, 3), place=p, big=rng.random() < 0.5)
                   for p in places)
    return Scene(background=rng.choice(_BACKGROUND_NAMES), groups=groups)


def describe(scene: Scene) -> str:
    """The true caption of a scene, e.g. "two small red circles at the top left and one
    big blue square at the right on a gray background"."""
    parts = []
    for g in scene.groups:
        noun = g.shape if g.count == 1 else PLURAL[g.shape]
        size = "big" if g.big else "small"
        parts.append(f"{NUMBERS[g.count - 1]} {size} {g.colour} {noun} at the {PLACES[g.place]}")
    return " and ".join(parts) + f" on a {scene.background} background"


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


@functools.lru_cache(maxsize=64)
def _background(name: str, size: int) -> np.ndarray:
    img = np.empty((size, size, 3), np.uint8)
    img[:] = BACKGROUNDS[name]
    img.flags.writeable = False
    return img


@functools.lru_cache(maxsize=64)
def _colour(name: str) -> np.ndarray:
    return np.asarray(COLOURS[name], np.uint8)


def render(scene: Scene, size: int, rng: random.Random) -> np.ndarray:
    """Draws the scene as a uint8 [size, size, 3] image (shapes centred on pixels)."""
    img = _background(scene.background, size).copy()  # (cheaper than filling a new one)
    cell = size / 3.0
    for g in scene.groups:
        sprite = _sprite(g.shape, round(cell * (0.22 if g.big else 0.13), 2))
        k = sprite.shape[0] // 2
        for _ in range(g.count):
            cy = int((g.place[0] + 0.5 + rng.uniform(-0.25, 0.25)) * cell)
            cx = int((g.place[1] + 0.5 + rng.uniform(-0.25, 0.25)) * cell)
            y0, y1 = max(cy - k, 0), min(cy + k + 1, size)
            x0, x1 = max(cx - k, 0), min(cx + k + 1, size)
            m = sprite[y0 - (cy - k):y1 - (cy - k), x0 - (cx - k):x1 - (cx - k)]
            np.copyto(img[y0:y1, x0:x1], _colour(g.colour), where=m[..., None])
    return img


def _caption(seed: int, index: int, scene: Scene, caption_noise: float) -> tuple[str, bool]:
    if caption_noise <= 0:
        return describe(scene), True  # (the noise stream below is not needed)
    nrng = _rng(seed, index, 2)
    if nrng.random() < caption_noise:
        if nrng.random() < 0.5:
            return nrng.choice(GENERIC), False
        other = describe(sample_scene(_rng(seed, nrng.getrandbits(62), 3)))
        return (other if other != describe(scene) else GENERIC[0]), False
    return describe(scene), True


def caption_of(seed: int, index: int, caption_noise: float = 0.0) -> tuple[str, bool]:
    """Caption of record `index` and whether it is clean (the scene's true description)."""
    return _caption(seed, index, sample_scene(_rng(seed, index, 1)), caption_noise)


def make_record(seed: int, index: int, size: int = 64, caption_noise: float = 0.0,
                with_image: bool = True) -> dict:
    """Sample `index`: {"image": uint8 [size,size,3], "text", "key", "source", "clean"}.

    The image depends only on (seed, index), never on `caption_noise`."""
    rng = _rng(seed, index, 1)
    scene = sample_scene(rng)
    text, clean = _caption(seed, index, scene, caption_noise)
    rec = {"text": text, "key": f"{index:012d}", "source": f"synthetic:{seed}",
           "clean": clean}
    if with_image:
        rec["image"] = render(scene, size, rng)
    return rec
