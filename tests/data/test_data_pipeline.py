"""The Grain pipeline on the synthetic source: batch formats, subsets, state, sharding."""
import numpy as np
import pytest

from configs import common
from vlm_jax.data import (BadDataError, Split, eval_batches, load_tokenizer, parse_size,
                          record_positions, source_for, split_for, train_iterator)
from vlm_jax.data import synthetic
from vlm_jax.data.pipeline import num_image_tokens


def tiny_config(kind="vlm", n=40, eval_n=12, batch=8, **data):
    c = common.base_config()
    c.model.kind = kind
    c.model.vision.image_size = 32
    c.model.vision.patch_size = 8
    c.train.batch_size = batch
    c.data.n = n
    c.data.eval_n = eval_n
    c.data.seq_len = 48
    c.data.num_threads = 2
    for k, v in data.items():
        c.data[k] = v
    return c


def model_keys(batch):
    return {k: v for k, v in batch.items() if not k.startswith("_")}


def test_vlm_batch_format_and_sequence_layout():
    c = tiny_config()
    k = num_image_tokens(c)
    assert k == 16  # (32 / 8)^2 patches, CLS dropped, mlp projector keeps them
    b = next(train_iterator(c))
    t = k + c.data.seq_len
    assert b["pixels"].shape == (8, 32, 32, 3) and b["pixels"].dtype == np.uint8
    from vlm_jax.models import batch_spec  # the batch is what the model compiles for
    spec = batch_spec(c, 8)
    assert set(spec) == set(model_keys(b))
    for key, sd in spec.items():
        assert (b[key].shape, b[key].dtype) == (sd.shape, sd.dtype), key
    for key, dtype in (("tokens", np.int32), ("targets", np.int32), ("loss_mask", np.float32),
                       ("positions", np.int32), ("segment_ids", np.int32),
                       ("visual_mask", np.bool_)):
        assert b[key].shape == (8, t) and b[key].dtype == dtype, key
    assert b["valid"].shape == (8,) and (b["valid"] == 1).all()
    tok = load_tokenizer("synthetic")
    for r in range(8):
        vm, seg = b["visual_mask"][r], b["segment_ids"][r]
        assert vm.sum() == k and vm[1:1 + k].all()  # plain template: bos, then the image
        assert (b["tokens"][r][vm] == c.model.image_token_id).all()
        n = seg.sum()
        assert b["tokens"][r][0] == tok.bos_id and b["tokens"][r][n - 1] == tok.eos_id
        np.testing.assert_array_equal(b["targets"][r][:n - 1], b["tokens"][r][1:n])
        # The loss covers exactly the caption tokens and the eos.
        lm = b["loss_mask"][r].astype(bool)
        np.testing.assert_array_equal(np.flatnonzero(lm), np.arange(k, n - 1))
        caption = tok.decode(b["targets"][r][lm])
        assert " on a " in caption and "background" in caption
        np.testing.assert_array_equal(b["positions"][r][:n], np.arange(n))
    # Raw RGB of the records (32 px synthetic images: no resize), normalised by the ViT.
    src = source_for(c)
    for r in range(8):
        np.testing.assert_array_equal(b["pixels"][r], src[int(b["_records"][r])]["image"])


def test_chat_template_masks_the_prompt():
    c = tiny_config(template="chat")
    b = next(train_iterator(c))
    tok = load_tokenizer("synthetic")
    row = b["tokens"][0]
    text = tok.decode(row[: b["segment_ids"][0].sum()])
    assert text.startswith("user :") and "describe the image . assistant :" in text
    caption = tok.decode(b["targets"][0][b["loss_mask"][0] > 0])
    assert "assistant" not in caption and "background" in caption


@pytest.mark.parametrize("kind", ["lm", "clip"])
def test_lm_and_clip_formats(kind):
    c = tiny_config(kind=kind)
    b = model_keys(next(train_iterator(c)))
    if kind == "lm":
        assert set(b) == {"tokens", "targets", "loss_mask", "positions", "segment_ids", "valid"}
        assert b["tokens"].shape == (8, 48)
    else:
        assert set(b) == {"pixels", "tokens", "segment_ids", "valid"}
        tok = load_tokenizer("synthetic")
        last = b["segment_ids"].sum(1) - 1
        assert (b["tokens"][np.arange(8), last] == tok.eos_id).all()


def test_truncation_is_counted():
    c = tiny_config(kind="lm", seq_len=8)
    b = next(train_iterator(c))
    assert b["_truncated"] > 0
    assert (b["segment_ids"].sum(1) == 8).all()


def test_packing_segments_and_restore():
    c = tiny_config(kind="lm", seq_len=64, packing=True)
    it = train_iterator(c)
    b = next(it)
    seg, pos = b["segment_ids"], b["positions"]
    assert seg.max() >= 2  # several captions per row
    for r in range(8):
        for s in range(1, seg[r].max() + 1):
            idx = np.flatnonzero(seg[r] == s)
            np.testing.assert_array_equal(pos[r][idx], np.arange(len(idx)))
    state = it.get_state()
    want = [next(it)["tokens"] for _ in range(2)]
    it2 = train_iterator(c)
    it2.set_state(state)
    got = [next(it2)["tokens"] for _ in range(2)]
    np.testing.assert_array_equal(np.stack(want), np.stack(got))


def test_subsets_nested_disjoint_and_epochs():
    small = split_for(tiny_config(n=30, eval_n=10))
    big = split_for(tiny_config(n=60, eval_n=10))
    tr_s, tr_b = set(small.train_records()), set(big.train_records())
    assert len(tr_s) == 30 and len(tr_b) == 60 and tr_s < tr_b
    assert set(big.eval_records()) == set(small.eval_records())
    assert not (tr_b & set(big.eval_records()))
    # Each epoch visits the whole subset once, in its own order.
    e0 = [small.train_record_at(p) for p in range(30)]
    e1 = [small.train_record_at(p) for p in range(30, 60)]
    assert set(e0) == set(e1) == tr_s and e0 != e1
    # The pipeline reports the epochs consumed.
    c = tiny_config(n=8, eval_n=4, batch=8)
    it = train_iterator(c)
    assert next(it)["_epoch"] == 1.0 and next(it)["_epoch"] == 2.0


def test_data_info_epochs():
    from vlm_jax.data import data_info
    c = tiny_config(n=40, eval_n=12, batch=8)
    c.train.steps = 15
    info = data_info(c)
    assert info == {"data_size": 40, "eval_size": 12, "epochs": 3.0, "num_image_tokens": 16,
                    "seq_len": 64}


def test_parse_size():
    assert parse_size("1M") == 10**6 and parse_size("1.5k") == 1500 and parse_size(7) == 7
    assert parse_size("all") == -1
    with pytest.raises(ValueError, match="data.n"):
        parse_size("lots")
    with pytest.raises(ValueError, match="needs 30 records"):
        Split.create(25, 20, 10)


def test_deterministic_and_state_restore_mid_epoch():
    c = tiny_config(n=20)
    a = train_iterator(c)
    batches = [next(a) for _ in range(3)]
    state = a.get_state()
    rest = [next(a) for _ in range(3)]
    b = train_iterator(c)
    for want in batches:
        np.testing.assert_array_equal(next(b)["tokens"], want["tokens"])
    fresh = train_iterator(c)
    fresh.set_state(state)
    for want in rest:
        got = next(fresh)
        np.testing.assert_array_equal(got["tokens"], want["tokens"])
        np.testing.assert_array_equal(got["pixels"], want["pixels"])


def test_two_processes_split_the_global_batch():
    c = tiny_config(n=32, batch=8)
    one = train_iterator(c)
    p0, p1 = train_iterator(c, 0, 2), train_iterator(c, 1, 2)
    for _ in range(5):  # crosses an epoch boundary
        full = next(one)
        a, b = next(p0), next(p1)
        assert a["tokens"].shape[0] == 4
        np.testing.assert_array_equal(np.concatenate([a["tokens"], b["tokens"]]),
                                      full["tokens"])
    rec = record_positions(c, 4, 1, 2)
    assert rec.shape == (4, 4)
    assert set(record_positions(c, 4).ravel()) == set(split_for(c).train_records())


def test_eval_batches_padded_and_sharded():
    c = tiny_config(eval_n=12, batch=8)
    batches = list(eval_batches(c))
    assert len(batches) == 2
    assert batches[0]["valid"].sum() == 8 and batches[1]["valid"].sum() == 4
    last = batches[1]
    assert last["loss_mask"][last["valid"] == 0].sum() == 0
    # Two processes: same number of batches each, disjoint valid rows covering the split.
    parts = [list(eval_batches(c, i, 2)) for i in range(2)]
    assert len(parts[0]) == len(parts[1]) == 2
    rows = [tuple(r) for p in parts for bt in p for r, v in zip(bt["tokens"], bt["valid"]) if v]
    want = [tuple(r) for bt in batches for r, v in zip(bt["tokens"], bt["valid"]) if v]
    assert sorted(rows) == sorted(want) and len(rows) == 12


def test_noisy_captions_fraction():
    clean = [synthetic.caption_of(0, i, 0.0)[1] for i in range(400)]
    noisy = [synthetic.caption_of(0, i, 0.4)[1] for i in range(400)]
    assert all(clean) and 0.3 < 1 - np.mean(noisy) < 0.5
    # Same images either way: only the captions change.
    a = source_for(tiny_config(name="synthetic_clean"))[5]
    b = source_for(tiny_config(name="synthetic_noisy"))[5]
    np.testing.assert_array_equal(a["image"], b["image"])
    tok = load_tokenizer("synthetic")
    assert tok.unk_id not in tok.encode(synthetic.caption_of(3, 9, 1.0)[0])


def test_bad_fraction_stops_the_run():
    c = tiny_config(n=200, batch=8, caption_noise=0.0)
    c.data.max_bad_fraction = 0.0
    # A tokenizer that cannot leave room for a caption is a config error, not a skip.
    c.data.seq_len = 2
    with pytest.raises(ValueError, match="seq_len"):
        next(train_iterator(c))
    assert issubclass(BadDataError, RuntimeError)


def test_synthetic_images_show_their_captions():
    for i in range(20):
        rec = synthetic.make_record(7, i, size=48)
        again = synthetic.make_record(7, i, size=48)
        np.testing.assert_array_equal(rec["image"], again["image"])  # a pure function
        scene = synthetic.scene_of(7, i)
        assert rec["text"] == synthetic.describe(scene)
        pixels = rec["image"].reshape(-1, 3)
        colours, counts = np.unique(pixels, axis=0, return_counts=True)
        assert tuple(colours[counts.argmax()]) == synthetic.BACKGROUNDS[scene.background]
        for g in scene.groups:
            if synthetic.COLOURS[g.colour] != synthetic.BACKGROUNDS[scene.background]:
                assert (pixels == synthetic.COLOURS[g.colour]).all(1).any(), (i, g)
