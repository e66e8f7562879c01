"""The vectorised synthetic source: records as pure functions of (seed, index), the batch
renderer against a naive painter, the documented distribution, the synthetic tokenizer's
flat encoding, and the pipeline's chunk path against its per-sample path."""
import hashlib
import pickle

import numpy as np
import pytest

from tests.data.test_data_pipeline import tiny_config
from vlm_jax.data import load_tokenizer, source_for, split_for, synthetic, train_iterator
from vlm_jax.data import pipeline as P
from vlm_jax.data import transforms as T
from vlm_jax.data.sources import SyntheticSource


def paint_naively(seed: int, index: int, size: int) -> np.ndarray:
    """The image of record `index` drawn shape by shape with the sprite masks (clipped at
    the borders): the reference for `render_batch`."""
    scenes = synthetic.sample_scenes(seed, [index])
    scene = scenes.scene(0)
    img = np.empty((size, size, 3), np.uint8)
    img[:] = synthetic.BACKGROUNDS[scene.background]
    cell = size / 3.0
    for g, group in enumerate(scene.groups):
        mask = synthetic._sprite(group.shape, round(cell * (0.22 if group.big else 0.13), 2))
        k = mask.shape[0] // 2
        for j in range(group.count):
            dy, dx = scenes.jitter[0, g, j]
            cy = int((group.place[0] + 0.5 + dy) * cell)
            cx = int((group.place[1] + 0.5 + dx) * cell)
            for y, x in zip(*np.nonzero(mask)):
                py, px = cy - k + y, cx - k + x
                if 0 <= py < size and 0 <= px < size:
                    img[py, px] = synthetic.COLOURS[group.colour]
    return img


@pytest.mark.parametrize("size", [9, 32, 48, 100])
def test_batch_renderer_equals_a_naive_painter(size):
    idx = np.arange(40) * 7919 + 3
    images = synthetic.make_batch(5, idx, size)["image"]
    assert images.shape == (40, size, size, 3) and images.dtype == np.uint8
    for r, i in enumerate(idx[:12] if size == 100 else idx):
        np.testing.assert_array_equal(images[r], paint_naively(5, int(i), size), err_msg=str(i))


def test_records_are_pure_functions_of_seed_and_index():
    idx = np.array([17, 3, 10**9 - 1, 3, 0, 123456])
    a = synthetic.make_batch(1, idx, 24, caption_noise=0.4)
    b = synthetic.make_batch(1, idx[::-1], 24, caption_noise=0.4)
    np.testing.assert_array_equal(a["image"], b["image"][::-1])
    assert a["text"] == b["text"][::-1] and a["key"][0] == "000000000017"
    # Another seed is another data set; noise changes captions, never images.
    assert synthetic.make_batch(2, idx, 24)["text"] != a["text"]
    np.testing.assert_array_equal(synthetic.make_batch(1, idx, 24)["image"], a["image"])
    assert "image" not in synthetic.make_batch(1, idx, 24, with_image=False)


@pytest.mark.parametrize("size", [9, 32, 100])
def test_one_record_path_equals_the_batch_path(size):
    """`make_record` (plain Python) is row for row `make_batch` (arrays)."""
    idx = np.concatenate([np.arange(150), [10**9 - 1, 2**40 + 5]])
    for seed, noise in ((1, 0.4), (2, 0.0), (3, 1.0)):
        batch = synthetic.make_batch(seed, idx, size, caption_noise=noise)
        for r, i in enumerate(idx.tolist()):
            rec = synthetic.make_record(seed, i, size, caption_noise=noise)
            assert (rec["text"], rec["clean"], rec["key"], rec["source"]) == (
                batch["text"][r], bool(batch["clean"][r]), batch["key"][r], batch["source"][r])
            assert (rec["text"], rec["clean"]) == synthetic.caption_of(seed, i, noise)
            np.testing.assert_array_equal(rec["image"], batch["image"][r], err_msg=str(i))
    u = synthetic.uniforms(7, [5, -(2**63) + 9], 3, 40)
    assert u[0].tolist() == synthetic._draws_one(7, 5, 3, 40)
    assert u[1].tolist() == synthetic._draws_one(7, 2**63 + 9, 3, 40)  # the same 64 bits


def test_generator_fingerprint():
    """Records of a fixed (seed, index) never change silently: anything derived from them
    (the frozen-feature cache) keys on GENERATOR_VERSION; bump it with this digest."""
    b = synthetic.make_batch(0, np.arange(64), 32, caption_noise=0.4)
    h = hashlib.sha256(b["image"].tobytes() + "\n".join(b["text"]).encode()
                       + b["clean"].tobytes()).hexdigest()[:16]
    assert (synthetic.GENERATOR_VERSION, h) == (2, "d792d0ccf4b8bc96"), h


def test_documented_distribution():
    n = 20000
    s = synthetic.sample_scenes(3, np.arange(n))
    tol = 4 / np.sqrt(n)  # ~4 sigma of a frequency

    def uniform(values, k, within=None):
        freq = np.bincount(values.ravel() if within is None else values[within], minlength=k)
        np.testing.assert_allclose(freq / freq.sum(), np.full(k, 1 / k), atol=tol)

    assert abs((s.groups == 2).mean() - 0.5) < tol
    two = s.groups == 2
    uniform(s.place[:, 0], 9)
    uniform(s.place[:, 1], 9, two)
    assert (s.place[:, 0] != s.place[:, 1]).all()
    uniform(s.shape, 3)
    uniform(s.colour, 8)
    uniform(s.count - 1, 3)
    uniform(s.background, 4)
    assert abs(s.big.mean() - 0.5) < tol
    assert s.jitter.min() >= -0.25 and s.jitter.max() < 0.25 and abs(s.jitter.mean()) < 0.01
    # Group slots draw independently: shape of slot 0 vs slot 1 (chi-square-ish check).
    joint = np.bincount(s.shape[:, 0] * 3 + s.shape[:, 1], minlength=9) / n
    np.testing.assert_allclose(joint, np.full(9, 1 / 9), atol=tol)
    # Captions: the clean ones describe the scene; the noisy fraction and its kinds.
    texts, clean = synthetic.captions(3, np.arange(n), s, caption_noise=0.4)
    assert abs((~clean).mean() - 0.4) < tol
    truth = synthetic.describe_all(s)
    assert all(texts[r] == truth[r] for r in np.flatnonzero(clean)[:2000])
    wrong = [texts[r] for r in np.flatnonzero(~clean)]
    generic = np.mean([t in synthetic.GENERIC for t in wrong])
    assert abs(generic - 0.5) < 3 * tol
    assert all(t in synthetic.GENERIC or " background" in t for t in wrong)
    assert not any(texts[r] == truth[r] for r in np.flatnonzero(~clean))
    for r in range(50):
        assert truth[r] == synthetic.describe(s.scene(r))


def test_source_reads_records_alone_or_in_batches():
    src = SyntheticSource(seed=4, image_size=16, caption_noise=0.4)
    idx = np.array([31, 32, 5, 200, 64])
    batch = src.get_batch(idx)
    assert set(batch) == {"image", "text", "key", "source"}
    for r, i in enumerate(idx):
        rec = src[int(i)]
        np.testing.assert_array_equal(rec["image"], batch["image"][r])
        assert (rec["text"], rec["key"], rec["source"]) == (
            batch["text"][r], batch["key"][r], batch["source"][r])
    clone = pickle.loads(pickle.dumps(src))
    assert clone == src and clone[5]["text"] == src[5]["text"]
    with pytest.raises(IndexError, match="out of range"):
        src[len(src)]
    with pytest.raises(IndexError, match="out of range"):
        src.get_batch([-1])
    text_only = SyntheticSource(seed=4, with_image=False)
    assert text_only[5]["image"] is None and text_only[5]["text"] == src[5]["text"]
    assert text_only.get_batch([5])["image"] is None


def test_synthetic_tokenizer_flat_encoding():
    tok = load_tokenizer("synthetic")
    texts = synthetic.make_batch(0, np.arange(50), 8, caption_noise=0.4)["text"] + [
        "What is in the IMAGE?\nA photo.", "a  zebra\tand a dog", "image,photo", "",
        "one\x1cred circle"]
    for part in (texts, texts[:1], texts[-5:], texts[50:51], []):
        flat, lens = tok.encode_flat(part)
        assert flat.dtype == np.int32 and lens.shape == (len(part),)
        got = [list(x) for x in np.split(flat, np.cumsum(lens)[:-1])] if len(part) else []
        assert got == tok.encode_batch(part), part
    # A text holding the join separator takes the per-text path.
    flat, lens = tok.encode_flat(["a\x00b", "red"])
    assert list(lens) == [len(tok.encode("a\x00b")), 1]


@pytest.mark.parametrize("kind,template,seq_len", [("vlm", "plain", 12), ("vlm", "chat", 14),
                                                   ("lm", "plain", 9), ("vlm", "plain", 40)])
def test_rows_from_flat_ids_equal_rows_from_lists(kind, template, seq_len):
    tok = load_tokenizer("synthetic")
    texts = synthetic.make_batch(0, np.arange(30), 8, caption_noise=0.4)["text"]
    spec = T.SequenceSpec(kind, seq_len, 3 if kind == "vlm" else 0, template, 7)
    a = T.build_sequences(tok.encode_batch(texts), tok, spec)
    b = T.build_sequences(tok.encode_flat(texts), tok, spec)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    # One row by hand: bos, (prompt,) image tokens, caption cut to fit, eos, pads.
    ids = tok.encode(texts[0])
    before, after = T._prompt_ids(tok, spec)
    room = seq_len - 2 - len(before) - len(after)
    row = [tok.bos_id] + before + [7] * spec.num_image_tokens + after + ids[:room] + [tok.eos_id]
    np.testing.assert_array_equal(a["tokens"][0][:len(row)], row)
    assert (a["tokens"][0][len(row):] == tok.pad_id).all()
    assert a["_truncated"][0] == (len(ids) > room)


def _chunks(config, items, keep_key=False):
    """LoadChunk outputs of the batch path and of the per-sample path."""
    cfg = P._resolved(config)
    load = P.LoadExample(source_for(cfg), P.example_transforms(cfg), cfg.model.kind != "lm",
                         keep_key=keep_key)
    chunk = P.LoadChunk(load)
    assert chunk.batched
    per_sample = P.LoadChunk(load)
    per_sample.batched = False
    return chunk.map(items), per_sample.map(items)


def _assert_same_chunk(a, b):
    assert a["order"] == b["order"]
    assert a["rows"].keys() == b["rows"].keys()
    for k in a["rows"]:
        assert a["rows"][k].dtype == b["rows"][k].dtype, k
        np.testing.assert_array_equal(a["rows"][k], b["rows"][k], err_msg=k)


@pytest.mark.parametrize("kind,template", [("vlm", "plain"), ("vlm", "chat"), ("lm", "plain"),
                                           ("clip", "plain")])
def test_chunk_batch_path_equals_per_sample_path(kind, template):
    c = tiny_config(kind=kind, template=template, name="synthetic_noisy")
    if kind == "clip":
        c.model.clip.text_max_len = 16
    items = [(p, 1000 + 3 * p) for p in range(8)]
    _assert_same_chunk(*_chunks(c, items, keep_key=True))
    # Eval padding (record -1) and a chunk of padding only.
    _assert_same_chunk(*_chunks(c, items[:5] + [(5, -1), (6, -1)]))
    a, b = _chunks(c, [(0, -1), (1, -1)])
    assert a["rows"] == {} == b["rows"] and a["order"] == b["order"]


def test_a_bad_sample_in_a_chunk_takes_the_per_sample_path(monkeypatch):
    c = tiny_config()
    batch, one = SyntheticSource.get_batch, SyntheticSource.__getitem__

    def get_batch(self, records):  # record 3 has a blank caption
        out = batch(self, records)
        out["text"] = ["" if int(r) == 3 else t for r, t in zip(records, out["text"])]
        return out

    def getitem(self, i):
        return {**one(self, i), "text": ""} if int(i) == 3 else one(self, i)

    monkeypatch.setattr(SyntheticSource, "get_batch", get_batch)
    monkeypatch.setattr(SyntheticSource, "__getitem__", getitem)
    a, b = _chunks(c, [(p, p) for p in range(6)])
    _assert_same_chunk(a, b)
    assert a["order"][3] == P._Bad("empty_caption", 3) and a["order"][4] == 3


def test_train_stream_unchanged_by_batch_size_of_reads():
    """The train stream is a function of the records: 2 processes' batches concatenated
    are the 1-process batch, and a restored iterator continues it mid-epoch."""
    c = tiny_config(n=24, batch=8)
    one = [next(it) for it in [train_iterator(c)] for _ in range(4)]
    halves = [train_iterator(c, i, 2) for i in range(2)]
    for want in one:
        got = [next(h) for h in halves]
        for k in ("pixels", "tokens", "loss_mask", "_records"):
            np.testing.assert_array_equal(np.concatenate([g[k] for g in got]), want[k])
    src = source_for(c)
    for r, rec in enumerate(one[3]["_records"]):
        np.testing.assert_array_equal(one[3]["pixels"][r], src[int(rec)]["image"])
    epoch = np.concatenate([b["_records"] for b in one[:3]])
    assert sorted(epoch) == sorted(split_for(c).train_records())  # one epoch, each once


@pytest.mark.parametrize("order,total,n,eval_n", [("prefix", 10**9, 7, 3), ("permute", 50, 7, 3),
                                                  ("permute", 50, 1, 0), ("prefix", 9, 9, 0)])
def test_vectorised_train_positions_equal_the_scalar_ones(order, total, n, eval_n):
    from vlm_jax.data.subsets import Split
    split = Split.create(total, n, eval_n, data_seed=3, train_seed=5, order=order)
    for first, count in ((0, 5), (4, 12), (61, 3), (0, 0)):
        want = [split.train_record_at(p) for p in range(first, first + count)]
        got = split.train_records_at(first, count)
        assert got.dtype == np.int64 and got.tolist() == want
