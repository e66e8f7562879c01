"""NaViL data: native-resolution images, the image token layout, and sequence packing.

One sample `{"image": uint8 HWC, "text": str}` becomes one *example*:

- any-res: the image is resized to a grid of `gh x gw` cells of 32x32 pixels (a 2x2 block
  of 16-pixel patches, i.e. one LLM token after the 0.5 pixel shuffle), keeping its aspect
  ratio, as close to its native size as the token budget allows. Images over the budget
  are downscaled (never cropped or truncated); tiny images are upscaled to
  `min_image_tokens`. Optional multi-scale input adds scales shrinking by tau = sqrt(2)/2.
- patches: 16x16 patches laid out in 2x2 blocks, block-major in row-major block order
  (block (R, C) holds patches (2R, 2C), (2R, 2C+1), (2R+1, 2C), (2R+1, 2C+1)), so the
  connector's pixel shuffle is a plain reshape [4k, w] -> [k, 4w] (see `pixel_shuffle_ref`).
- LLM tokens: `<bos> <begin_of_image> (<img> * gw <end_of_line>) * gh [<end_of_scale> next
  scale ...] <end_of_image> caption <eos>`; inputs/targets are the sequence shifted by one,
  the loss covers the caption and `<eos>`, `visual_mask` marks the `<img>` positions whose
  embeddings the model replaces by the connector outputs (in order).

The *token budget* `max_image_tokens` bounds every LLM token an image costs (visual tokens,
`<end_of_line>`s, the begin/end/scale markers), so an image always fits a sequence that
`validate` accepted.

Batches (`config.model.kind == "native"`, see `batch_spec`), b rows, T = data.seq_len LLM
tokens and P = data.native.max_patches ViT patches per row:
  patches f32 [b,P,16*16*3] (normalised), patch_rows/patch_cols i32 [b,P] (patch grid
  coordinates within its image), patch_segment_ids i32 [b,P] (image of the patch within the
  row, 1-based, 0 = padding; each scale is its own image), tokens/targets i32 [b,T],
  loss_mask f32 [b,T], positions i32 [b,T] (restart at 0 per sample), segment_ids i32 [b,T]
  (sample within the row, 1-based, 0 = padding), visual_mask bool [b,T], valid f32 [b].
With packing, several examples share a row (first fit over the rows of the batch being
built); without, each row holds one example (the padded baseline).
"""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Callable, Iterator, Sequence

import grain
import numpy as np
from PIL import Image

from vlm_jax.bounded_cache import BoundedCache
from vlm_jax.data.errors import BadSample
from vlm_jax.data.native_config import native_data_config, special_ids  # noqa: F401

TAU = math.sqrt(2) / 2
# InternViT / ImageNet normalisation.
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)
SPECIAL_TOKENS = ("<begin_of_image>", "<end_of_image>", "<end_of_line>", "<end_of_scale>",
                  "<img>")


# --------------------------------------------------------------------------- spec
@dataclasses.dataclass(frozen=True)
class NativeSpec:
    """Everything the native data path needs, resolved from a config (see `spec_from_config`)."""
    seq_len: int                 # LLM tokens per row
    max_patches: int             # ViT patches per row
    max_image_tokens: int        # LLM tokens one image may cost (all scales, markers incl.)
    min_image_tokens: int = 1    # visual tokens of the largest scale (upscale tiny images)
    num_scales: int = 1
    patch_size: int = 16
    merge: int = 2               # 1 / pixel-shuffle ratio
    boi_id: int = 0
    eoi_id: int = 0
    eol_id: int = 0
    eos_scale_id: int = 0
    image_token_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    pad_id: int = 0
    packing: bool = True

    @property
    def unit(self) -> int:
        """Pixels per side of one LLM image token (patch_size * merge)."""
        return self.patch_size * self.merge

    @property
    def patch_dim(self) -> int:
        return self.patch_size * self.patch_size * 3


def spec_from_config(config, tokenizer=None) -> NativeSpec:
    """NativeSpec from a full config (`model.native` holds the special token ids,
    `data.native` the budgets). Validates it (`validate`)."""
    m, d = config.model, config.data
    nd = d.native
    ids = {k: int(m.native[k]) for k in ("boi_id", "eoi_id", "eol_id", "eos_scale_id")}
    ids["image_token_id"] = int(m.image_token_id)
    llm = m.llm
    bos = tokenizer.bos_id if tokenizer is not None else llm.bos_id
    eos = tokenizer.eos_id if tokenizer is not None else llm.eos_id
    pad = tokenizer.pad_id if tokenizer is not None else llm.pad_id
    seq_len = int(d.seq_len)
    spec = NativeSpec(
        seq_len=seq_len, max_patches=int(nd.max_patches) or 2 * seq_len,
        max_image_tokens=int(nd.max_image_tokens), min_image_tokens=int(nd.min_image_tokens),
        num_scales=int(nd.num_scales), patch_size=int(m.vision.patch_size),
        merge=int(round(1 / float(m.projector.shuffle_ratio))), bos_id=int(bos),
        eos_id=int(eos), pad_id=int(pad), packing=bool(d.packing), **ids)
    validate(spec, vocab_size=int(llm.vocab_size))
    return spec


def max_visual_tokens(spec: NativeSpec) -> int:
    """The most visual tokens one image can have under the budget (a bound)."""
    s = spec.num_scales
    # Each scale costs at least one <end_of_line> per row; rows >= 1.
    return spec.max_image_tokens - 2 - (s - 1) - s


def validate(spec: NativeSpec, vocab_size: int | None = None) -> None:
    """Raises ValueError naming the fields when a sequence cannot hold one image."""
    s = spec.num_scales
    if s < 1:
        raise ValueError(f"data.native.num_scales={s}: must be >= 1")
    min_cost = 2 + (s - 1) + 2 * s  # every scale at 1x1: <img> <end_of_line>
    if spec.max_image_tokens < min_cost:
        raise ValueError(
            f"data.native.max_image_tokens={spec.max_image_tokens} cannot hold one image with "
            f"num_scales={s}: the smallest image (1x1 tokens per scale plus <begin_of_image>, "
            f"<end_of_image>, <end_of_line> and <end_of_scale> markers) costs {min_cost}; "
            f"raise it to >= {min_cost}")
    need = spec.max_image_tokens + 2  # <bos> + at least <eos>
    if spec.seq_len < need:
        raise ValueError(
            f"data.seq_len={spec.seq_len} cannot hold one image: an image may cost up to "
            f"data.native.max_image_tokens={spec.max_image_tokens} LLM tokens, plus <bos> and "
            f"<eos> = {need}; set data.seq_len >= {need} or lower data.native.max_image_tokens")
    need_p = spec.merge ** 2 * max_visual_tokens(spec)
    if spec.max_patches < need_p:
        raise ValueError(
            f"data.native.max_patches={spec.max_patches} cannot hold one image: up to "
            f"{max_visual_tokens(spec)} visual tokens (max_image_tokens="
            f"{spec.max_image_tokens}) need {need_p} patches of {spec.patch_size}px; set "
            f"data.native.max_patches >= {need_p} (0 = 2 * seq_len)")
    if spec.min_image_tokens < 1 or spec.min_image_tokens > max_visual_tokens(spec):
        raise ValueError(f"data.native.min_image_tokens={spec.min_image_tokens}: must be in "
                         f"[1, {max_visual_tokens(spec)}] for max_image_tokens="
                         f"{spec.max_image_tokens}")
    if vocab_size is not None:
        for k in ("boi_id", "eoi_id", "eol_id", "eos_scale_id", "image_token_id"):
            v = getattr(spec, k)
            if not 0 <= v < vocab_size:
                raise ValueError(f"special token {k}={v} is outside the LLM vocabulary "
                                 f"[0, {vocab_size}) (model.native / model.image_token_id)")


# --------------------------------------------------------------------------- any-res
def _grid(h: float, w: float, s: float, unit: int) -> tuple[int, int]:
    return max(1, int(round(h * s / unit))), max(1, int(round(w * s / unit)))


def scale_grids(h: float, w: float, s: float, spec: NativeSpec) -> list[tuple[int, int]]:
    """Token grids (rows, cols) of every scale for resize factor s (scale k: s * tau^k)."""
    return [_grid(h, w, s * TAU ** k, spec.unit) for k in range(spec.num_scales)]


def image_cost(grids: Sequence[tuple[int, int]]) -> int:
    """LLM tokens an image costs: visual tokens + <end_of_line> per row + markers."""
    return sum(gh * gw + gh for gh, gw in grids) + (len(grids) - 1) + 2


def anyres_grids(h: int, w: int, spec: NativeSpec) -> list[tuple[int, int]]:
    """Token grids of an h x w image: native size (rounded to multiples of `unit`) when it
    fits the budget, else the largest aspect-preserving downscale that does; images with
    fewer than `min_image_tokens` visual tokens are upscaled (within the budget)."""
    if h < 1 or w < 1:
        raise BadSample("zero_size_image", f"{h}x{w}")

    def fits(s):
        return image_cost(scale_grids(h, w, s, spec)) <= spec.max_image_tokens

    def visual(s):
        gh, gw = scale_grids(h, w, s, spec)[0]
        return gh * gw

    if fits(1.0):
        s = 1.0
        if visual(1.0) < spec.min_image_tokens:
            lo, hi = 1.0, 2.0
            while visual(hi) < spec.min_image_tokens and fits(hi) and hi < 1e9:
                lo, hi = hi, hi * 2
            for _ in range(60):  # smallest s reaching min tokens, then stay within budget
                mid = (lo + hi) / 2
                lo, hi = (mid, hi) if visual(mid) < spec.min_image_tokens else (lo, mid)
            s = hi
            while not fits(s) and s > 1.0:
                s = max(1.0, s * 0.99)
    else:
        lo, hi = 0.0, 1.0  # fits(lo) (every grid 1x1, checked by validate), not fits(hi)
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        s = lo
    grids = scale_grids(h, w, s, spec)
    assert image_cost(grids) <= spec.max_image_tokens, (h, w, grids)
    return grids


# --------------------------------------------------------------------------- images
def to_rgb(image) -> np.ndarray:
    """uint8 [H, W, 3] from encoded bytes or an HW / HWC array (the pipeline's decoder:
    grayscale repeated, alpha composited over white); BadSample for zero-size images."""
    from vlm_jax.data.transforms import decode_image
    return decode_image(image)


def resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bicubic resize of uint8 [H, W, 3] (antialiased when shrinking, PIL)."""
    if image.shape[:2] == (height, width):
        return image
    return np.asarray(Image.fromarray(image).resize((width, height), Image.BICUBIC))


def patchify(image: np.ndarray, patch: int, merge: int):
    """uint8/float [gh*m*p, gw*m*p, 3] -> (patches [gh*gw*m*m, p*p*3] in 2x2-block order,
    rows, cols [gh*gw*m*m] patch-grid coordinates)."""
    hh, ww, c = image.shape
    u = patch * merge
    gh, gw = hh // u, ww // u
    x = image.reshape(gh, merge, patch, gw, merge, patch, c)
    x = x.transpose(0, 3, 1, 4, 2, 5, 6)      # R, C, dy, dx, py, px, c
    patches = x.reshape(gh * gw * merge * merge, patch * patch * c)
    R, C, dy, dx = np.meshgrid(np.arange(gh), np.arange(gw), np.arange(merge),
                               np.arange(merge), indexing="ij")
    rows = (R * merge + dy).reshape(-1).astype(np.int32)
    cols = (C * merge + dx).reshape(-1).astype(np.int32)
    return patches, rows, cols


def pixel_shuffle_ref(grid: np.ndarray, merge: int = 2) -> np.ndarray:
    """NumPy reference of the pixel shuffle on a 2D feature grid [H, W, C] ->
    [H/m * W/m, m*m*C]: token (R, C) concatenates the features of patches (mR+dy, mC+dx)
    in (dy, dx) order. The model's reshape of block-ordered patches must equal this."""
    h, w, c = grid.shape
    x = grid.reshape(h // merge, merge, w // merge, merge, c).transpose(0, 2, 1, 3, 4)
    return x.reshape((h // merge) * (w // merge), merge * merge * c)


def image_token_ids(grids: Sequence[tuple[int, int]], spec: NativeSpec) -> list[int]:
    """`<begin_of_image> (<img>*gw <end_of_line>)*gh [<end_of_scale> ...] <end_of_image>`."""
    out = [spec.boi_id]
    for k, (gh, gw) in enumerate(grids):
        if k:
            out.append(spec.eos_scale_id)
        for _ in range(gh):
            out.extend([spec.image_token_id] * gw)
            out.append(spec.eol_id)
    out.append(spec.eoi_id)
    return out


# --------------------------------------------------------------------------- examples
def encode_example(image, text_ids: Sequence[int], spec: NativeSpec) -> dict[str, np.ndarray]:
    """One sample -> one example (variable sizes; see the module docstring).

    Returns patches f32 [p, patch_dim], patch_rows/patch_cols/patch_image i32 [p] (image =
    scale index), tokens/targets i32 [t], loss_mask f32 [t], visual_mask bool [t]. The
    caption is cut to fit `seq_len` (never the image: `validate` guarantees it fits).
    """
    img = to_rgb(image)
    grids = anyres_grids(img.shape[0], img.shape[1], spec)
    ps, rs, cs, ims = [], [], [], []
    for k, (gh, gw) in enumerate(grids):
        x = resize(img, gh * spec.unit, gw * spec.unit)
        x = (x.astype(np.float32) / 255.0 - MEAN) / STD
        p, r, c = patchify(x, spec.patch_size, spec.merge)
        ps.append(p), rs.append(r), cs.append(c), ims.append(np.full(len(r), k, np.int32))
    img_ids = image_token_ids(grids, spec)
    text = [int(t) for t in text_ids]
    room = spec.seq_len + 1 - (1 + len(img_ids) + 1)  # sequence length is inputs + 1
    text = text[:max(room, 0)]
    seq = [spec.bos_id] + img_ids + text + [spec.eos_id]
    seq = seq[:spec.seq_len + 1]
    seq = np.asarray(seq, np.int32)
    tokens, targets = seq[:-1], seq[1:]
    n = len(tokens)
    vis = np.zeros(n, bool)
    # Visual positions: the <img> tokens inside the image span (by construction, so a
    # caption token that happens to share the id is never replaced).
    span = np.asarray(img_ids, np.int32)
    vis[1:1 + len(span)] = span == spec.image_token_id
    loss = np.zeros(n, np.float32)
    loss[len(img_ids):] = 1.0  # targets from the first caption token (or <eos>) on
    patches = np.concatenate(ps).astype(np.float32)
    assert vis.sum() * spec.merge ** 2 == len(patches)
    return dict(patches=patches, patch_rows=np.concatenate(rs), patch_cols=np.concatenate(cs),
                patch_image=np.concatenate(ims), tokens=tokens, targets=targets,
                loss_mask=loss, visual_mask=vis)


# --------------------------------------------------------------------------- batches
def empty_batch(spec: NativeSpec, rows: int) -> dict[str, np.ndarray]:
    t, p = spec.seq_len, spec.max_patches
    return dict(
        patches=np.zeros((rows, p, spec.patch_dim), np.float32),
        patch_rows=np.zeros((rows, p), np.int32), patch_cols=np.zeros((rows, p), np.int32),
        patch_segment_ids=np.zeros((rows, p), np.int32),
        tokens=np.full((rows, t), spec.pad_id, np.int32),
        targets=np.full((rows, t), spec.pad_id, np.int32),
        loss_mask=np.zeros((rows, t), np.float32), positions=np.zeros((rows, t), np.int32),
        segment_ids=np.zeros((rows, t), np.int32), visual_mask=np.zeros((rows, t), bool),
        valid=np.zeros((rows,), np.float32))


class RowPacker:
    """Builds one batch of `rows` rows. `add(example)` places it in the first row with
    room for its tokens and patches (only the current row without packing) and returns
    False when it fits nowhere (the batch is full)."""

    def __init__(self, spec: NativeSpec, rows: int):
        self.spec, self.rows = spec, rows
        self.batch = empty_batch(spec, rows)
        self.tok = [0] * rows
        self.pat = [0] * rows
        self.samples = [0] * rows
        self.images = [0] * rows
        self.count = 0

    def _fits(self, r, nt, np_):
        return (self.tok[r] + nt <= self.spec.seq_len
                and self.pat[r] + np_ <= self.spec.max_patches)

    def add(self, ex: dict) -> bool:
        nt, np_ = len(ex["tokens"]), len(ex["patches"])
        if nt > self.spec.seq_len or np_ > self.spec.max_patches:
            raise ValueError(f"an example of {nt} tokens and {np_} patches does not fit a row "
                             f"of data.seq_len={self.spec.seq_len} tokens and "
                             f"data.native.max_patches={self.spec.max_patches} patches")
        if self.spec.packing:
            cands = range(self.rows)
        else:
            cands = [self.count] if self.count < self.rows else []
        row = next((r for r in cands if self._fits(r, nt, np_)), None)
        if row is None:
            return False
        b = self.batch
        t0, p0 = self.tok[row], self.pat[row]
        self.samples[row] += 1
        seg = self.samples[row]
        for k in ("tokens", "targets", "loss_mask", "visual_mask"):
            b[k][row, t0:t0 + nt] = ex[k]
        b["positions"][row, t0:t0 + nt] = np.arange(nt, dtype=np.int32)
        b["segment_ids"][row, t0:t0 + nt] = seg
        for k in ("patches", "patch_rows", "patch_cols"):
            b[k][row, p0:p0 + np_] = ex[k]
        b["patch_segment_ids"][row, p0:p0 + np_] = self.images[row] + 1 + ex["patch_image"]
        self.images[row] += (int(ex["patch_image"].max()) + 1) if np_ else 0
        b["valid"][row] = 1.0
        self.tok[row] += nt
        self.pat[row] += np_
        self.count += 1
        return True

    def stats(self) -> dict[str, float]:
        return {"examples": self.count, "tokens": sum(self.tok), "patches": sum(self.pat)}


def pack(examples: Sequence[dict], spec: NativeSpec, rows: int) -> list[dict]:
    """Packs a list of examples into batches of `rows` rows (the last may be part empty)."""
    out, packer = [], RowPacker(spec, rows)
    for ex in examples:
        if not packer.add(ex):
            out.append(packer.batch)
            packer = RowPacker(spec, rows)
            assert packer.add(ex)
    if packer.count:
        out.append(packer.batch)
    return out


class PackedBatchIterator(grain.DatasetIterator):
    """Packs a stream of examples into fixed-shape batches.

    Items that are not dicts are bad samples (with a `.reason`, e.g. the pipeline's
    `_Bad`): they are counted by reason and skipped; more than `max_bad_fraction` of them
    (after `min_seen` samples) raises `BadDataError`. Batches carry the pipeline's
    `_skipped/<reason>` metadata. Checkpointable: the state is the parent's state (and
    counters) before the example left over from the last batch was read.
    """

    def __init__(self, parent: grain.DatasetIterator, spec: NativeSpec, rows: int,
                 max_bad_fraction: float = 1.0, min_seen: int = 100):
        super().__init__(parent)
        self._spec, self._rows = spec, rows
        self._max_bad, self._min_seen = max_bad_fraction, min_seen
        self._pending = None
        self._pending_state = None
        self._counts: dict[str, int] = {}
        self._seen = 0

    def _state(self):
        return {"parent": self._parent.get_state(), "counts": dict(self._counts),
                "seen": self._seen}

    def _next_good(self):
        while True:
            ex = next(self._parent)
            self._seen += 1
            if isinstance(ex, dict):
                return ex
            reason = getattr(ex, "reason", "bad_sample") or "bad_sample"
            self._counts[reason] = self._counts.get(reason, 0) + 1
            bad = sum(self._counts.values())
            if self._seen >= self._min_seen and bad > self._max_bad * self._seen:
                from vlm_jax.data.errors import BadDataError
                raise BadDataError(
                    f"{bad} of {self._seen} samples read were bad ({bad / self._seen:.1%} > "
                    f"data.max_bad_fraction={self._max_bad:g}); by reason: {self._counts}",
                    self._counts, self._seen)

    def __next__(self):
        packer = RowPacker(self._spec, self._rows)
        if self._pending is not None:
            assert packer.add(self._pending)
            self._pending = self._pending_state = None
        while True:
            state = self._state()
            try:
                ex = self._next_good()
            except StopIteration:
                if packer.count:
                    break
                raise
            if not packer.add(ex):
                self._pending, self._pending_state = ex, state
                break
        batch = packer.batch
        for reason, c in self._counts.items():
            batch[f"_skipped/{reason}"] = np.int64(c)
        batch["_seen"] = np.int64(self._seen)
        # Rows are not examples here: how many samples (each with one image) this batch holds.
        batch["_examples"] = np.int64(packer.count)
        batch["_images"] = np.int64(packer.count)
        return batch

    def get_state(self):
        return dict(self._pending_state) if self._pending is not None else self._state()

    def set_state(self, state):
        self._parent.set_state(state["parent"])
        self._counts = dict(state.get("counts", {}))
        self._seen = int(state.get("seen", 0))
        self._pending = self._pending_state = None


class PackedBatchDataset(grain.IterDataset):
    """IterDataset of examples -> IterDataset of native batches (`PackedBatchIterator`)."""

    def __init__(self, parent: grain.IterDataset, spec: NativeSpec, rows: int,
                 max_bad_fraction: float = 1.0):
        super().__init__(parent)
        self._spec, self._rows, self._max_bad = spec, rows, max_bad_fraction

    def __iter__(self):
        return PackedBatchIterator(self._parent.__iter__(), self._spec, self._rows,
                                   self._max_bad)


# --------------------------------------------------------------------------- pipeline
class LoadNative(grain.transforms.Map):
    """(position, record) -> example, or the pipeline's `_Bad` for an unusable sample.

    Synthetic sources render squares; `mixed` = (sizes, aspect_ratios) resizes record i to
    a size and aspect ratio chosen by (seed, i), giving mixed-resolution data."""

    def __init__(self, source, spec: NativeSpec, tokenizer, seed: int = 0, mixed=None):
        self.source, self.spec, self.tok, self.seed, self.mixed = (source, spec, tokenizer,
                                                                   seed, mixed)

    def map(self, item):
        from vlm_jax.data import transforms as T
        from vlm_jax.data.pipeline import _Bad
        position, record = item
        if record < 0:
            return _Bad("", position)  # padding of the eval split
        try:
            sample = self.source[record]
            img = T.decode_image(sample.get("image"))
            if self.mixed:
                img = mixed_resolution(img, self.seed, record, *self.mixed)
            ids = self.tok.encode(T.caption_text(sample.get("text")))
            ex = encode_example(img, ids, self.spec)
        except BadSample as e:
            return _Bad(e.reason, position)
        return ex


def mixed_resolution(img: np.ndarray, seed: int, index: int, sizes: Sequence[int],
                     aspect_ratios: Sequence[float]) -> np.ndarray:
    """Resizes a (synthetic) image to a size x aspect ratio (h / w) picked by (seed, index)."""
    rng = np.random.default_rng([seed, index, 7])
    size = int(sizes[rng.integers(len(sizes))])
    ar = float(aspect_ratios[rng.integers(len(aspect_ratios))])
    return resize(img, max(1, int(round(size * math.sqrt(ar)))),
                  max(1, int(round(size / math.sqrt(ar)))))


def _setup(config):
    from vlm_jax.data import pipeline as P
    from vlm_jax.data.tokenizer import load_tokenizer
    config = P._resolved(config)
    d = config.data
    tok = load_tokenizer(d.tokenizer)
    spec = spec_from_config(config, tok)
    src = P.source_for(config)
    split = P.split_for(config, src)
    mixed = None
    if d.source == "synthetic":
        nd = d.native
        mixed = (tuple(nd.get("image_sizes", (64,))), tuple(nd.get("aspect_ratios", (1.0,))))
    load = LoadNative(src, spec, tok, int(d.seed), mixed)
    return config, spec, split, load


def train_iterator(config, process_index: int = 0, process_count: int = 1):
    """Endless, checkpointable iterator of per-process native batches (the hook that
    `vlm_jax.data.pipeline.train_iterator` calls for model.kind "native"). Row r of
    process p's batch s reads the same records as the non-native pipeline would."""
    from vlm_jax.data import pipeline as P
    config, spec, split, load = _setup(config)
    global_b = int(config.train.batch_size)
    b = P._per_process(global_b, process_count, "train.batch_size")
    offset = process_index * b

    def locate(j: int):
        pos = (j // b) * global_b + offset + j % b
        return pos, split.train_record_at(pos)

    ds = grain.MapDataset.range(0, P._ENDLESS).map(locate).map(load)
    it = ds.to_iter_dataset(P._read_options(config, b))
    return iter(PackedBatchDataset(it, spec, b, float(config.data.max_bad_fraction)))


def eval_batches(config, process_index: int = 0, process_count: int = 1) -> list[dict]:
    """The eval split once, packed like training (`data.packing`: several examples per
    row, each its own segment, so the token-mean loss equals the unpacked one) into
    global batches; process p takes rows p*b..(p+1)*b of each (every process packs the
    whole split the same way, so all run the same number of batches). Bad samples are
    skipped and counted (`_skipped/<reason>`); empty rows have valid=0 and loss_mask=0.

    Kept in memory (`_EVAL_BATCHES`, read-only arrays) by what decides them: the data
    config, the `NativeSpec` (the model fields the data path reads), the eval batch size
    and the processes. The runs of a grid worker that differ only in model sizes (the
    native stage's LLM x encoder grid) build them once."""
    from vlm_jax.data import pipeline as P
    config, spec, split, load = _setup(config)
    global_b = int(config.train.eval_batch_size or config.train.batch_size)
    b = P._per_process(global_b, process_count, "train.eval_batch_size")
    key = json.dumps([config.data.to_dict(), dataclasses.asdict(spec), global_b,
                      process_index, process_count], sort_keys=True, default=str)
    cached = _EVAL_BATCHES.get_or_load(key, lambda: _build_eval_batches(
        spec, split, load, global_b, slice(process_index * b, (process_index + 1) * b)))
    return [dict(batch) for batch in cached]


def _build_eval_batches(spec, split, load, global_b: int, rows: slice) -> list[dict]:
    examples, counts = [], {}
    for pos in range(split.eval_n):
        ex = load.map((pos, split.eval_record(pos)))
        if isinstance(ex, dict):
            examples.append(ex)
        else:
            reason = getattr(ex, "reason", "") or "bad_sample"
            counts[reason] = counts.get(reason, 0) + 1
    out = []
    for batch in pack(examples, spec, global_b) or [empty_batch(spec, global_b)]:
        batch = {k: v[rows] for k, v in batch.items()}
        for reason, c in counts.items():
            batch[f"_skipped/{reason}"] = np.int64(c)
        for v in batch.values():
            if isinstance(v, np.ndarray):
                v.flags.writeable = False   # shared by the runs that get them from the cache
        out.append(batch)
    return out


# (key -> list of batches), bounded like the trainer's eval batches (VLM_JAX_EVAL_CACHE_MB)
_EVAL_BATCHES = BoundedCache("VLM_JAX_EVAL_CACHE_MB", 256)


# --------------------------------------------------------------------------- synthetic
def synthetic_image(seed: int, index: int, sizes: Sequence[int],
                    aspect_ratios: Sequence[float], caption_noise: float = 0.0) -> dict:
    """A synthetic sample at a mixed resolution (`mixed_resolution` of the shapes scene)."""
    from vlm_jax.data import synthetic
    rec = synthetic.make_record(seed, index, size=max(sizes), caption_noise=caption_noise)
    rec["image"] = mixed_resolution(rec["image"], seed, index, sizes, aspect_ratios)
    return rec


def synthetic_examples(spec: NativeSpec, encode_text: Callable, n: int, seed: int = 0,
                       sizes: Sequence[int] = (32, 64, 96, 128),
                       aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0)) -> Iterator[dict]:
    """Encoded mixed-resolution synthetic examples (tests and benchmarks)."""
    for i in range(n):
        rec = synthetic_image(seed, i, sizes, aspect_ratios)
        yield encode_example(rec["image"], encode_text(rec["text"]), spec)


def batch_spec(config, batch_size: int) -> dict[str, Any]:
    """Shapes/dtypes of a native batch (jax.ShapeDtypeStruct) for init and AOT compile."""
    import jax
    import jax.numpy as jnp
    spec = spec_from_config(config)
    b, t, p = batch_size, spec.seq_len, spec.max_patches
    sds = jax.ShapeDtypeStruct
    return dict(patches=sds((b, p, spec.patch_dim), jnp.float32),
                patch_rows=sds((b, p), jnp.int32), patch_cols=sds((b, p), jnp.int32),
                patch_segment_ids=sds((b, p), jnp.int32),
                tokens=sds((b, t), jnp.int32), targets=sds((b, t), jnp.int32),
                loss_mask=sds((b, t), jnp.float32), positions=sds((b, t), jnp.int32),
                segment_ids=sds((b, t), jnp.int32), visual_mask=sds((b, t), jnp.bool_),
                valid=sds((b,), jnp.float32))
