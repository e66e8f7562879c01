"""Per-sample transforms: decode, resize, normalise, template + tokenise, pack.

Each step is a plain function plus a Grain `MapTransform` wrapping it, so any Grain
pipeline can use them. A transform that cannot use a sample raises `BadSample(reason)`;
the pipeline drops the sample and counts it (see `REASONS`).

Sequence layout (docs/contracts.md), kind "vlm", T = K image tokens + `seq_len`:

    [bos] prompt_before [img]*K prompt_after caption... [eos] [pad]...

`targets[t] = tokens[t+1]`; `loss_mask[t] = 1` exactly where the target is a caption
token or the final eos. "plain" has no prompt (`<image> caption</s>`, LLaVA-1.5 stage 1);
"chat" is Vicuna-v1 style: `USER: <image>\\nDescribe the image. ASSISTANT: caption</s>`.
Kind "lm": `[bos] caption [eos]`, T = `seq_len`. Kind "clip": `[bos] caption [eos]`
(eos kept when truncated: the text tower pools the last token).
"""
from __future__ import annotations

import dataclasses
import functools
import io
import itertools
from typing import Any

import grain
import numpy as np
from PIL import Image, ImageFile, ImageOps

from vlm_jax.data.errors import BadSample

# Skip reasons, in the order they are reported.
REASONS = ("empty_image", "decode_error", "missing_image", "missing_caption",
           "empty_caption", "bad_utf8", "truncated_member", "truncated_shard",
           "unreadable_shard", "bad_record")

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

ImageFile.LOAD_TRUNCATED_IMAGES = False


# ----------------------------------------------------------------------------- images
def decode_image(data: Any, draft_size: int = 0, as_pil: bool = False):
    """Encoded bytes (or an array) -> uint8 RGB [H, W, 3] (or, for encoded bytes with
    `as_pil`, an RGB PIL image: saves a copy when `resize_image` comes next).

    Applies the EXIF orientation; palette, grayscale, 16-bit, CMYK and alpha images become
    RGB (transparent pixels over white). `draft_size` lets JPEG decode at a reduced DCT
    scale that still leaves both sides >= draft_size (much faster for big images).
    """
    if data is None:
        raise BadSample("missing_image")
    if isinstance(data, np.ndarray):
        return _array_to_rgb(data)  # already decoded: stays an array
    if isinstance(data, memoryview):
        data = data.tobytes()
    if not isinstance(data, (bytes, bytearray)):
        raise BadSample("decode_error", f"image of type {type(data).__name__}")
    if len(data) == 0:
        raise BadSample("empty_image", "zero-byte image")
    try:
        img = Image.open(io.BytesIO(data))
        if draft_size and img.format == "JPEG":
            img.draft("RGB", (draft_size, draft_size))
        img.load()
        ImageOps.exif_transpose(img, in_place=True)
        img = _to_rgb(img)
        return img if as_pil else np.asarray(img, np.uint8)
    except BadSample:
        raise
    except Exception as e:  # PIL raises many types for corrupt data  # noqa: BLE001
        raise BadSample("decode_error", f"{type(e).__name__}: {e}") from None


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.width < 1 or img.height < 1:
        raise BadSample("empty_image", "image with no pixels")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(img, np.float64)
        hi = a.max() if a.size else 1.0
        scale = 255.0 / (65535.0 if hi > 255 and img.mode.startswith("I;16") else max(hi, 1.0))
        img = Image.fromarray(np.clip(a * scale, 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "RGB" and "transparency" in img.info):
        img = img.convert("RGBA")
        bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, img)
    if img.mode != "RGB":
        img = img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV, RGBA (composited)
    return img


def _array_to_rgb(a: np.ndarray) -> np.ndarray:
    if a.size == 0:
        raise BadSample("empty_image", "image with no pixels")
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[-1] not in (1, 3, 4):
        raise BadSample("decode_error", f"image array of shape {a.shape}")
    if a.dtype != np.uint8:
        a = np.clip(a, 0, 255).astype(np.uint8)
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    elif a.shape[-1] == 4:
        alpha = a[..., 3:4].astype(np.float32) / 255.0
        a = (a[..., :3] * alpha + 255.0 * (1 - alpha)).round().astype(np.uint8)
    return a


def resize_image(img, size: int, mode: str = "crop") -> np.ndarray:
    """uint8 [H, W, 3] (or an RGB PIL image) -> uint8 [size, size, 3] (bicubic, as CLIP).

    "crop": shorter side to `size`, then centre crop. "pad": longer side to `size`, then
    pad to a square with the CLIP mean colour (LLaVA's "pad" aspect mode).

    "crop" resamples only the source box that lands in the crop (PIL's `box=`): the same
    bicubic filter, its support clipped at the image (not the box) edges, so the output is
    the resize-then-crop image (to +-1 of rounding) for 1/4 less work on average.
    """
    pil = img if isinstance(img, Image.Image) else None
    h, w = (pil.height, pil.width) if pil is not None else img.shape[:2]
    if (h, w) == (size, size):
        return np.asarray(pil, np.uint8) if pil is not None else img
    if mode not in ("crop", "pad"):
        raise ValueError(f"data.resize={mode!r}: use 'crop' or 'pad'")
    scale = size / min(h, w) if mode == "crop" else size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    pil = pil if pil is not None else Image.fromarray(img)
    # Big images first shrink by an integer factor (box filter) to >= 3x the target,
    # then resample bicubically (PIL's reducing_gap; quality loss negligible).
    gap = None if max(h, w) < 3 * size else 3.0
    if mode == "crop":
        top, left = (nh - size) // 2, (nw - size) // 2
        box = (left * w / nw, top * h / nh, (left + size) * w / nw, (top + size) * h / nh)
        return np.asarray(pil.resize((size, size), Image.BICUBIC, box=box,
                                     reducing_gap=gap), np.uint8)
    if (nh, nw) != (h, w):
        pil = pil.resize((nw, nh), Image.BICUBIC, reducing_gap=gap)
    out = np.asarray(pil, np.uint8)
    canvas = np.empty((size, size, 3), np.uint8)
    canvas[:] = np.round(np.array(CLIP_MEAN) * 255).astype(np.uint8)
    top, left = (size - nh) // 2, (size - nw) // 2
    canvas[top:top + nh, left:left + nw] = out
    return canvas


def normalize(pixels: np.ndarray, mean=CLIP_MEAN, std=CLIP_STD) -> np.ndarray:
    """uint8 [..., 3] -> float32 (x/255 - mean) / std (works on single images and batches)."""
    scale = np.asarray(std, np.float32) * 255.0
    return (pixels.astype(np.float32) - np.asarray(mean, np.float32) * 255.0) / scale


# ----------------------------------------------------------------------------- text
def caption_text(value: Any) -> str:
    """A caption from a source field (str, bytes, list of captions) or BadSample."""
    if isinstance(value, (list, tuple, np.ndarray)) and not isinstance(value, (bytes, str)):
        value = value[0] if len(value) else None
    if value is None:
        raise BadSample("missing_caption")
    if isinstance(value, (bytes, bytearray, np.bytes_, memoryview)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError as e:
            raise BadSample("bad_utf8", str(e)) from None
    text = str(value).strip()
    if not text:
        raise BadSample("empty_caption")
    return text


def caption_texts(values) -> list[str]:
    """`caption_text` of each value (one pass when all are non-blank str)."""
    if all(type(v) is str for v in values):
        texts = [v.strip() for v in values]
        if all(texts):
            return texts
    return [caption_text(v) for v in values]


TEMPLATES = {
    # name: (text before the image, text between the image and the caption)
    "plain": ("", ""),
    "chat": ("USER: ", "\nDescribe the image. ASSISTANT: "),
}


@dataclasses.dataclass(frozen=True)
class SequenceSpec:
    """How to lay out one example's token row (see the module docstring)."""
    kind: str                  # vlm | lm | clip
    seq_len: int               # text tokens (vlm/lm) or total tokens (clip)
    num_image_tokens: int = 0  # K (vlm)
    template: str = "plain"
    image_token_id: int = 0

    @property
    def length(self) -> int:
        return self.seq_len + (self.num_image_tokens if self.kind == "vlm" else 0)


def _prompt_ids(tokenizer, spec: SequenceSpec) -> tuple[list[int], list[int]]:
    if spec.kind != "vlm":
        return [], []
    if spec.template not in TEMPLATES:
        raise ValueError(f"data.template={spec.template!r}: use one of {sorted(TEMPLATES)}")
    before, after = TEMPLATES[spec.template]
    return (tokenizer.encode(before) if before else [],
            tokenizer.encode(after) if after else [])


def build_sequence(caption_ids: list[int], tokenizer, spec: SequenceSpec,
                   prompt: tuple[list[int], list[int]] | None = None) -> dict[str, np.ndarray]:
    """Token row + targets + masks for one example (numpy, unbatched)."""
    return {k: v[0] for k, v in build_sequences([caption_ids], tokenizer, spec, prompt).items()}


def build_sequences(caption_ids, tokenizer, spec: SequenceSpec,
                    prompt: tuple[list[int], list[int]] | None = None) -> dict[str, np.ndarray]:
    """Token rows + targets + masks of several examples at once, stacked [n, T], built
    with whole-array ops (no per-row loop). `caption_ids`: a list of id lists, or
    (flat ids, lengths) as `Tokenizer.encode_flat` returns them."""
    before, after = prompt if prompt is not None else _prompt_ids(tokenizer, spec)
    k = spec.num_image_tokens if spec.kind == "vlm" else 0
    fixed = 1 + len(before) + len(after)  # bos + prompt
    room = spec.seq_len - fixed - 1       # caption tokens that fit with the eos
    if room < 1:
        raise ValueError(f"data.seq_len={spec.seq_len} leaves no room for a caption after "
                         f"the {spec.template!r} template ({fixed} tokens); raise data.seq_len")
    flat, lens = (caption_ids if isinstance(caption_ids, tuple)
                  else flatten_ids(caption_ids))
    head = [tokenizer.bos_id] + before + [spec.image_token_id] * k + after
    rows, t, h = len(lens), spec.length, len(head)
    cap = np.minimum(lens, room)
    if (cap < lens).any():  # drop the ids past `room` of each caption
        flat = flat[np.arange(len(flat)) - np.repeat(np.cumsum(lens) - lens, lens)
                    < np.repeat(cap, lens)]
    tokens = np.full((rows, t + 1), tokenizer.pad_id, np.int32)
    tokens[:, :h] = head
    ar1 = _arange(t + 1)
    tokens[(ar1 >= h) & (ar1 < (h + cap)[:, None])] = flat  # row-major: row by row
    ends = h + cap
    tokens[np.arange(rows), ends] = tokenizer.eos_id
    lengths = (ends + 1)[:, None]
    ar = ar1[:t]
    valid = ar < lengths
    out = {"tokens": np.ascontiguousarray(tokens[:, :t]),
           "targets": np.ascontiguousarray(tokens[:, 1:]),
           # targets = caption tokens and the eos
           "loss_mask": ((ar >= h - 1) & (ar < lengths - 1)).astype(np.float32),
           "positions": np.where(valid, ar, np.int32(0)),
           "segment_ids": valid.astype(np.int32),
           "_truncated": (lens > room).astype(np.int32)}
    if spec.kind == "vlm":
        vm = np.zeros((rows, t), bool)
        vm[:, 1 + len(before):1 + len(before) + k] = True
        out["visual_mask"] = vm
    return out


def flatten_ids(caption_ids) -> tuple[np.ndarray, np.ndarray]:
    """A list of id lists -> (int32 flat ids, int64 lengths)."""
    lens = np.fromiter(map(len, caption_ids), np.int64, len(caption_ids))
    flat = np.fromiter(itertools.chain.from_iterable(caption_ids), np.int32, int(lens.sum()))
    return flat, lens


@functools.lru_cache(maxsize=16)
def _arange(t: int) -> np.ndarray:
    a = np.arange(t, dtype=np.int32)
    a.flags.writeable = False
    return a


def build_clip_tokens(caption_ids: list[int], tokenizer, length: int) -> dict[str, np.ndarray]:
    """`[bos] caption [eos]` padded to `length`; the eos survives truncation."""
    truncated = len(caption_ids) > length - 2
    ids = [tokenizer.bos_id] + list(caption_ids[:length - 2]) + [tokenizer.eos_id]
    tokens = np.full((length,), tokenizer.pad_id, np.int32)
    tokens[:len(ids)] = ids
    return {"tokens": tokens, "segment_ids": (np.arange(length) < len(ids)).astype(np.int32),
            "_truncated": np.int32(truncated)}


# ----------------------------------------------------------------------------- Grain
class DecodeImage(grain.transforms.Map):
    """sample["image"] (bytes or array) -> uint8 RGB array (an RGB PIL image with
    `as_pil`, for a `ResizeImage` that follows)."""

    def __init__(self, draft_size: int = 0, as_pil: bool = False):
        self.draft_size, self.as_pil = draft_size, as_pil

    def map(self, sample: dict) -> dict:
        return {**sample, "image": decode_image(sample.get("image"), self.draft_size,
                                                self.as_pil)}

    def map_batch(self, batch: dict) -> dict:
        """`map` of stacked samples (batch["image"]: [n, H, W, C] array or a list)."""
        images = batch.get("image")
        if not (isinstance(images, np.ndarray) and images.ndim == 4
                and images.dtype == np.uint8 and images.shape[-1] == 3):
            images = [decode_image(im, self.draft_size, self.as_pil) for im in
                      (images if images is not None else [None] * len(batch["text"]))]
        return {**batch, "image": images}


class ResizeImage(grain.transforms.Map):
    def __init__(self, size: int, mode: str = "crop"):
        self.size, self.mode = size, mode

    def map(self, sample: dict) -> dict:
        return {**sample, "image": resize_image(sample["image"], self.size, self.mode)}

    def map_batch(self, batch: dict) -> dict:
        """`map` of stacked samples: uint8 [n, size, size, 3] out."""
        images = batch["image"]
        if isinstance(images, np.ndarray) and images.shape[1:3] == (self.size, self.size):
            return batch
        return {**batch, "image": np.stack([resize_image(im, self.size, self.mode)
                                            for im in images])}


class NormalizeImage(grain.transforms.Map):
    """sample["image"] uint8 -> sample["pixels"] float32, CLIP mean/std."""

    def __init__(self, mean=CLIP_MEAN, std=CLIP_STD):
        self.mean, self.std = mean, std

    def map(self, sample: dict) -> dict:
        out = {k: v for k, v in sample.items() if k != "image"}
        out["pixels"] = normalize(sample["image"], self.mean, self.std)
        return out


class TokenizeCaption(grain.transforms.Map):
    """sample["text"] -> tokens/targets/loss_mask/positions/segment_ids(/visual_mask).

    `caption` (per sample; raises BadSample) and `build` (several captions at once: one
    tokenizer call, rows built together) split the work for `pipeline.LoadChunk`."""

    def __init__(self, tokenizer, spec: SequenceSpec):
        self.tokenizer, self.spec = tokenizer, spec
        self._prompt = None

    def caption(self, sample: dict) -> tuple[dict, str]:
        """(sample without "text", its checked caption)."""
        return {k: v for k, v in sample.items() if k != "text"}, caption_text(sample.get("text"))

    def build(self, captions: list[str]) -> dict[str, np.ndarray]:
        """Stacked [n, T] fields of n captions."""
        if self.spec.kind == "clip":
            rows = [build_clip_tokens(ids, self.tokenizer, self.spec.seq_len)
                    for ids in self.tokenizer.encode_batch(captions)]
            return {k: np.stack([r[k] for r in rows]) for k in rows[0]}
        if self._prompt is None:
            self._prompt = _prompt_ids(self.tokenizer, self.spec)
        return build_sequences(self.tokenizer.encode_flat(captions), self.tokenizer,
                               self.spec, self._prompt)

    def map(self, sample: dict) -> dict:
        out, text = self.caption(sample)
        out.update({k: v[0] for k, v in self.build([text]).items()})
        return out


# ----------------------------------------------------------------------------- packing
PACK_KEYS = ("tokens", "targets", "loss_mask", "positions", "segment_ids")


def example_length(ex: dict) -> int:
    return int(ex["segment_ids"].sum())


def pack_rows(examples: list[dict], length: int, pad_id: int) -> dict[str, np.ndarray]:
    """Concatenates text-only examples into one row: segment_ids 1, 2, ... and positions
    restarting at 0 in each segment (the attention mask keeps segments apart)."""
    row = {k: np.zeros((length,), np.float32 if k == "loss_mask" else np.int32)
           for k in PACK_KEYS}
    row["tokens"][:] = pad_id
    row["targets"][:] = pad_id
    at = 0
    for seg, ex in enumerate(examples, start=1):
        n = example_length(ex)
        if at + n > length:
            raise ValueError("examples do not fit in one packed row")
        for k in ("tokens", "targets", "loss_mask"):
            row[k][at:at + n] = ex[k][:n]
        row["positions"][at:at + n] = np.arange(n)
        row["segment_ids"][at:at + n] = seg
        at += n
    return row
