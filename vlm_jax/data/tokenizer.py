"""Tokenizers loaded from local files, behind one small interface.

`load_tokenizer(spec)`:
- "synthetic": the built-in word-level tokenizer of the synthetic source (ids: 0 pad,
  1 bos, 2 eos, 3 unk, then `synthetic.VOCAB`);
- a directory with `tokenizer.json` (Hugging Face `tokenizers`; special tokens from
  `tokenizer_config.json` / `special_tokens_map.json` when present), or the json file;
- a SentencePiece `*.model` file, or a directory holding `tokenizer.model`.

Every tokenizer has `encode(text) -> list[int]` (no special tokens added), `encode_batch`,
`encode_flat(texts) -> (int32 flat ids, int64 lengths)` (what the pipeline builds rows
from; the synthetic tokenizer makes it with one regex pass and one table lookup),
`decode(ids)`,
`vocab_size`, `bos_id`, `eos_id`, `pad_id`. The underlying library object is loaded
lazily and dropped when pickled, so a tokenizer crosses into Grain worker processes as
its spec only.
"""
from __future__ import annotations

import json
import os
import re
from typing import Sequence

import numpy as np

from etils import epath

_WORD = re.compile(r"\w+|\n|[^\w\s]")


class Tokenizer:
    """Common interface; subclasses implement `_load`, `encode` and `decode`."""

    spec: str = ""

    def __init__(self, spec: str):
        self.spec = spec
        self._impl = None

    @property
    def impl(self):
        if self._impl is None:
            self._impl = self._load()
        return self._impl

    def _load(self):  # pragma: no cover - abstract
        raise NotImplementedError

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_impl"] = None
        return state

    def encode(self, text: str) -> list[int]:  # pragma: no cover - abstract
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` of several texts (one library call where the library batches)."""
        return [self.encode(t) for t in texts]

    def encode_flat(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """`encode_batch` concatenated: (int32 ids of all texts, int64 [n] lengths)."""
        from vlm_jax.data.transforms import flatten_ids
        return flatten_ids(self.encode_batch(texts))

    def decode(self, ids: Sequence[int]) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self):
        return (f"{type(self).__name__}({self.spec!r}, vocab_size={self.vocab_size}, "
                f"bos={self.bos_id}, eos={self.eos_id}, pad={self.pad_id})")


class SyntheticTokenizer(Tokenizer):
    """Word-level tokenizer over `synthetic.VOCAB` (lower-cased; punctuation split off)."""

    SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")

    def __init__(self):
        super().__init__("synthetic")
        from vlm_jax.data import synthetic
        self.words = self.SPECIALS + tuple(synthetic.VOCAB)
        self._ids = {w: i for i, w in enumerate(self.words)}
        self._ids_sep = {**self._ids, self._SEP: -1}
        assert all(_WORD.fullmatch(w) for w in synthetic.VOCAB), "a word is not one token"
        self.pad_id, self.bos_id, self.eos_id, self.unk_id = 0, 1, 2, 3
        self.vocab_size = len(self.words)

    def _load(self):
        return self._ids

    def encode(self, text: str) -> list[int]:
        return [self._ids.get(w, self.unk_id) for w in _WORD.findall(text.lower())]

    _SEP = "\x00"  # a one-character token of `_WORD`; no word id has it

    def encode_flat(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """All texts at once: their join (a `_SEP` token between two texts) is split on
        whitespace and looked up in one pass; where a piece is not a word of the vocab
        (punctuation attached to a word, an unknown word) or a newline occurs, the
        regex pass of `encode` over the join instead. Equal to `encode_batch`: every
        word of the vocab is one `_WORD` token."""
        if not texts:
            return np.zeros((0,), np.int32), np.zeros((0,), np.int64)
        joined = f" {self._SEP} ".join(texts).lower()
        if joined.count(self._SEP) != len(texts) - 1:  # a text holds _SEP itself
            return super().encode_flat(texts)
        ids = None
        if "\n" not in joined:
            words = joined.split()
            try:
                ids = np.fromiter(map(self._ids_sep.__getitem__, words), np.int32, len(words))
            except KeyError:
                pass
        if ids is None:
            get, unk = self._ids_sep.get, self.unk_id
            words = _WORD.findall(joined)
            ids = np.fromiter([get(w, unk) for w in words], np.int32, len(words))
        is_sep = ids < 0
        bounds = np.flatnonzero(np.concatenate([[True], is_sep, [True]]))
        return ids[~is_sep], bounds[1:] - bounds[:-1] - 1

    def decode(self, ids: Sequence[int]) -> str:
        out = []
        for i in ids:
            i = int(i)
            if i in (self.pad_id, self.bos_id, self.eos_id):
                continue
            out.append(self.words[i] if 0 <= i < self.vocab_size else "<unk>")
        return " ".join(out).replace(" \n ", "\n")


def _token_content(tok) -> str | None:
    if isinstance(tok, dict):
        return tok.get("content")
    return tok


def _special_names(folder: epath.Path) -> dict[str, str]:
    """bos/eos/pad/unk token strings from tokenizer_config.json / special_tokens_map.json."""
    names: dict[str, str] = {}
    for fname in ("special_tokens_map.json", "tokenizer_config.json"):
        f = folder / fname
        if not f.exists():
            continue
        try:
            cfg = json.loads(f.read_text())
        except (ValueError, OSError) as e:
            raise ValueError(f"{f}: not valid JSON ({e}); fix or remove the file") from e
        for k in ("bos_token", "eos_token", "pad_token", "unk_token"):
            v = _token_content(cfg.get(k))
            if v and k not in names:
                names[k] = v
    return names


class HFTokenizer(Tokenizer):
    """A `tokenizers` tokenizer.json (what transformers' fast tokenizers save)."""

    _BOS = ("<s>", "<|begin_of_text|>", "<|startoftext|>", "<bos>", "[CLS]", "<|endoftext|>")
    _EOS = ("</s>", "<|end_of_text|>", "<|endoftext|>", "<|im_end|>", "<eos>", "[SEP]")
    _PAD = ("<pad>", "<|pad|>", "[PAD]", "<unk>")

    def __init__(self, file: str):
        super().__init__(file)
        path = epath.Path(file)
        impl = self.impl
        names = _special_names(path.parent)
        vocab = impl.get_vocab(with_added_tokens=True)

        def pick(key, fallbacks, default):
            for name in ([names[key]] if key in names else []) + list(fallbacks):
                if name in vocab:
                    return int(vocab[name])
            return default

        self.vocab_size = int(impl.get_vocab_size(with_added_tokens=True))
        self.eos_id = pick("eos_token", self._EOS, None)
        if self.eos_id is None:
            raise ValueError(f"{file}: no end-of-sequence token found (looked for "
                             f"{names.get('eos_token') or self._EOS}); set eos_token in "
                             "tokenizer_config.json")
        self.bos_id = pick("bos_token", self._BOS, self.eos_id)
        self.pad_id = pick("pad_token", self._PAD, 0)

    def _load(self):
        from tokenizers import Tokenizer as _T
        return _T.from_str(epath.Path(self.spec).read_text())

    def encode(self, text: str) -> list[int]:
        return list(self.impl.encode(text, add_special_tokens=False).ids)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(e.ids) for e in self.impl.encode_batch(list(texts),
                                                            add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self.impl.decode([int(i) for i in ids], skip_special_tokens=True)


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model (Llama-1/2, Vicuna, InternLM2 ship one)."""

    def __init__(self, file: str):
        super().__init__(file)
        sp = self.impl
        self.vocab_size = int(sp.get_piece_size())
        self.eos_id = int(sp.eos_id())
        if self.eos_id < 0:
            raise ValueError(f"{file}: the SentencePiece model has no eos piece; retrain it "
                             "with --eos_id or use a tokenizer.json")
        self.bos_id = int(sp.bos_id()) if sp.bos_id() >= 0 else self.eos_id
        pad = sp.pad_id()
        self.pad_id = int(pad) if pad >= 0 else (int(sp.unk_id()) if sp.unk_id() >= 0 else 0)

    def _load(self):
        import sentencepiece as spm
        return spm.SentencePieceProcessor(model_proto=epath.Path(self.spec).read_bytes())

    def encode(self, text: str) -> list[int]:
        return list(self.impl.encode(text))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(ids) for ids in self.impl.encode(list(texts))]

    def decode(self, ids: Sequence[int]) -> str:
        return self.impl.decode([int(i) for i in ids])


def load_tokenizer(spec: str) -> Tokenizer:
    """Loads a tokenizer from "synthetic", a tokenizer.json (or its dir) or a .model file."""
    spec = str(spec or "").strip()
    if spec in ("", "synthetic"):
        return SyntheticTokenizer()
    path = epath.Path(os.path.expanduser(spec))
    if not path.exists():
        raise FileNotFoundError(f"data.tokenizer={spec!r}: no such file or directory; give "
                                "'synthetic', a dir with tokenizer.json or a SentencePiece "
                                ".model file")
    if path.is_dir():
        for name, cls in (("tokenizer.json", HFTokenizer),
                          ("tokenizer.model", SentencePieceTokenizer)):
            if (path / name).exists():
                return cls(str(path / name))
        raise FileNotFoundError(f"data.tokenizer={spec!r}: the directory has neither "
                                "tokenizer.json nor tokenizer.model")
    if path.name.endswith(".json"):
        return HFTokenizer(str(path))
    if path.name.endswith(".model"):
        return SentencePieceTokenizer(str(path))
    raise ValueError(f"data.tokenizer={spec!r}: unknown tokenizer file type; expected "
                     "tokenizer.json or a SentencePiece .model")
