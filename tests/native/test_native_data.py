"""NaViL data: any-res sizes, pixel-shuffle order, token layout, packing, bad input."""
import math

import grain
import numpy as np
import pytest

from vlm_jax.data import native as dn
from vlm_jax.data.errors import BadSample
from vlm_jax.models.native import shuffle_tokens

IDS = dict(boi_id=90, eoi_id=91, eol_id=92, eos_scale_id=93, image_token_id=94)


def spec(**kw):
    d = dict(seq_len=256, max_patches=512, max_image_tokens=64, **IDS)
    d.update(kw)
    s = dn.NativeSpec(**d)
    dn.validate(s, vocab_size=100)
    return s


def test_pixel_shuffle_matches_numpy_reference():
    s = spec()
    gh, gw = 3, 5
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (gh * 32, gw * 32, 3)).astype(np.float32)
    patches, rows, cols = dn.patchify(img, 16, 2)
    assert patches.shape == (gh * gw * 4, 16 * 16 * 3)
    # The patch grid as a 2D "feature map" [2gh, 2gw, 768].
    grid = img.reshape(2 * gh, 16, 2 * gw, 16, 3).transpose(0, 2, 1, 3, 4).reshape(
        2 * gh, 2 * gw, 768)
    np.testing.assert_array_equal(patches, grid[rows, cols])
    got = np.asarray(shuffle_tokens(patches[None], 2))[0]
    want = dn.pixel_shuffle_ref(grid, 2)
    assert got.shape == (gh * gw, 4 * 768)
    np.testing.assert_array_equal(got, want)
    # Token (R, C) holds patches (2R+dy, 2C+dx) in (dy, dx) order, row-major in (R, C).
    r, c = 1, 3
    tok = want[r * gw + c].reshape(4, 768)
    np.testing.assert_array_equal(tok[1], grid[2 * r, 2 * c + 1])
    np.testing.assert_array_equal(tok[2], grid[2 * r + 1, 2 * c])
    del s


def test_anyres_keeps_native_size_within_budget():
    s = spec()
    assert dn.anyres_grids(64, 96, s) == [(2, 3)]
    assert dn.anyres_grids(70, 100, s) == [(2, 3)]   # rounded to multiples of 32
    assert dn.anyres_grids(224, 160, s) == [(7, 5)]  # cost 35 + 7 + 2 = 44 <= 64


@pytest.mark.parametrize("h,w", [(4000, 3000), (1000, 1000), (300, 2000), (5000, 40)])
def test_anyres_downscales_large_images_keeping_aspect(h, w):
    s = spec()
    (gh, gw), = dn.anyres_grids(h, w, s)
    assert dn.image_cost([(gh, gw)]) <= s.max_image_tokens
    # Not wastefully small: one more row and column would not fit.
    assert dn.image_cost([(gh + 1, gw + 1)]) > s.max_image_tokens
    if min(gh, gw) >= 3:
        assert abs(math.log((gh / gw) / (h / w))) < 0.35


@pytest.mark.parametrize("h,w", [(1, 1), (1, 5000), (5000, 1), (2, 3), (17, 1)])
def test_anyres_degenerate_images(h, w):
    s = spec(min_image_tokens=4)
    grids = dn.anyres_grids(h, w, s)
    (gh, gw), = grids
    assert gh >= 1 and gw >= 1 and dn.image_cost(grids) <= s.max_image_tokens
    ex = dn.encode_example(np.full((h, w, 3), 200, np.uint8), [5, 6], s)
    assert ex["visual_mask"].sum() == gh * gw and len(ex["patches"]) == 4 * gh * gw
    if h == w == 1:
        assert gh * gw >= 4  # upscaled to min_image_tokens


def test_anyres_rejects_zero_size_and_odd_arrays():
    s = spec()
    with pytest.raises(BadSample, match="empty_image"):
        dn.encode_example(np.zeros((0, 5, 3), np.uint8), [1], s)
    with pytest.raises(BadSample, match="zero_size"):
        dn.anyres_grids(0, 7, s)
    with pytest.raises(BadSample, match="decode_error"):
        dn.encode_example(np.zeros((4, 5, 2), np.uint8), [1], s)
    gray = dn.encode_example(np.full((40, 40), 9, np.uint8), [1], s)
    rgba = dn.encode_example(np.concatenate([np.full((40, 40, 3), 9, np.uint8),
                                             np.full((40, 40, 1), 255, np.uint8)], -1), [1], s)
    np.testing.assert_array_equal(gray["patches"], rgba["patches"])


def test_token_layout_single_and_multi_scale():
    s = spec()
    ex = dn.encode_example(np.zeros((64, 96, 3), np.uint8), [7, 8, 9], s)
    seq = list(ex["tokens"]) + [ex["targets"][-1]]
    img = [IDS["image_token_id"]]
    want = ([1, 90] + img * 3 + [92] + img * 3 + [92] + [91] + [7, 8, 9, 2])
    assert seq == want
    np.testing.assert_array_equal(ex["targets"], want[1:])
    assert ex["visual_mask"].tolist() == [t == 94 for t in want[:-1]]
    # Loss on the caption and <eos> only.
    assert ex["loss_mask"].tolist() == [0.0] * 10 + [1.0] * 4
    ms = spec(num_scales=3, max_image_tokens=160, max_patches=1024)
    grids = dn.anyres_grids(256, 256, ms)
    assert grids == [(8, 8), (6, 6), (4, 4)]  # shrinking by tau = sqrt(2)/2
    ids = dn.image_token_ids(grids, ms)
    assert ids.count(93) == 2 and ids.count(92) == 8 + 6 + 4
    assert ids[0] == 90 and ids[-1] == 91
    ex = dn.encode_example(np.zeros((256, 256, 3), np.uint8), [7], ms)
    assert sorted(set(ex["patch_image"].tolist())) == [0, 1, 2]
    assert ex["visual_mask"].sum() * 4 == len(ex["patches"])


def test_sequence_that_cannot_hold_one_image_is_a_clear_error():
    with pytest.raises(ValueError, match=r"data.seq_len=40 cannot hold one image.*>= 66"):
        spec(seq_len=40)
    with pytest.raises(ValueError, match=r"data.native.max_patches=100 .*61 visual tokens.*>= 244"):
        spec(max_patches=100)
    with pytest.raises(ValueError, match="max_image_tokens=3 cannot hold one image"):
        spec(max_image_tokens=3)
    with pytest.raises(ValueError, match="outside the LLM vocabulary"):
        dn.validate(dn.NativeSpec(seq_len=256, max_patches=512, max_image_tokens=64,
                                  **dict(IDS, image_token_id=100)), vocab_size=100)


def test_long_caption_is_cut_never_the_image():
    s = spec(seq_len=70)
    ex = dn.encode_example(np.zeros((1000, 1000, 3), np.uint8), list(range(3, 80)), s)
    assert len(ex["tokens"]) == 70
    assert ex["visual_mask"].sum() * 4 == len(ex["patches"]) > 0


def _examples(s, n, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        h, w = rng.integers(8, 200, 2)
        out.append(dn.encode_example(rng.integers(0, 255, (h, w, 3)).astype(np.uint8),
                                     rng.integers(3, 80, rng.integers(1, 30)).tolist(), s))
    return out


def test_packing_layout():
    s = spec()
    exs = _examples(s, 30)
    packed = dn.pack(exs, s, rows=4)
    padded = dn.pack(exs, dn.NativeSpec(**dict(vars(s), packing=False)), rows=4)
    assert len(padded) == 8 and len(packed) < len(padded)
    seen = 0
    for b in packed:
        for r in range(4):
            seg = b["segment_ids"][r]
            n = seg.max()
            seen += n
            # every sample's positions restart at 0 and its visual tokens match its patches
            nvis = b["visual_mask"][r].sum()
            assert nvis * 4 == (b["patch_segment_ids"][r] > 0).sum()
            for k in range(1, n + 1):
                pos = b["positions"][r][seg == k]
                np.testing.assert_array_equal(pos, np.arange(len(pos)))
            assert (b["loss_mask"][r][seg == 0] == 0).all()
    assert seen == 30
    # the first example lands intact at the start of row 0
    e, b = exs[0], packed[0]
    n, p = len(e["tokens"]), len(e["patches"])
    np.testing.assert_array_equal(b["tokens"][0, :n], e["tokens"])
    np.testing.assert_array_equal(b["patches"][0, :p], e["patches"])
    assert (b["patch_segment_ids"][0, :p] == 1).all()


def test_packed_iterator_checkpoint_resumes_identically():
    s = spec()
    exs = _examples(s, 40, seed=1)
    ds = dn.PackedBatchDataset(grain.MapDataset.source(exs).to_iter_dataset(), s, rows=2)
    it = iter(ds)
    next(it), next(it)
    state = it.get_state()
    rest = [b["tokens"] for b in it]
    it2 = iter(ds)
    it2.set_state(state)
    rest2 = [b["tokens"] for b in it2]
    assert len(rest) == len(rest2) > 0
    for a, b in zip(rest, rest2):
        np.testing.assert_array_equal(a, b)
    total = sum(int(b["segment_ids"].max(1).sum()) for b in dn.PackedBatchDataset(
        grain.MapDataset.source(exs).to_iter_dataset(), s, rows=2))
    assert total == 40  # nothing dropped or duplicated


def test_pipeline_hook_train_and_eval():
    """vlm_jax.data.pipeline dispatches kind "native" here: fixed shapes, packed rows,
    resumable state, an eval split of whole padded batches."""
    from configs import native as cn
    from vlm_jax.data import pipeline
    from vlm_jax.models import batch_spec
    c = cn.get_config("demo_run,batch_size=4")
    c.data.eval_n = 10
    it = pipeline.train_iterator(c)
    b = next(it)
    want = batch_spec(c, 4)
    for k, s in want.items():
        assert b[k].shape == s.shape and b[k].dtype == s.dtype, k
    assert b["segment_ids"].max() >= 2  # several samples per row
    assert ((b["patch_segment_ids"] > 0).sum(1) == 4 * b["visual_mask"].sum(1)).all()
    state = it.get_state()
    nxt = next(it)
    it2 = pipeline.train_iterator(c)
    it2.set_state(state)
    np.testing.assert_array_equal(next(it2)["tokens"], nxt["tokens"])
    # two processes read disjoint rows of the global batch
    c2 = cn.get_config("demo_run,batch_size=8")
    a0 = next(pipeline.train_iterator(c2, 0, 2))
    a1 = next(pipeline.train_iterator(c2, 1, 2))
    assert a0["tokens"].shape[0] == 4 and not np.array_equal(a0["tokens"], a1["tokens"])
    ev = list(pipeline.eval_batches(c))
    # packed like training: the 10 examples in fewer than 3 batches of 4 rows
    assert len(ev) < 3 and sum(int(e["segment_ids"].max(1).sum()) for e in ev) == 10
    assert ev[-1]["loss_mask"][ev[-1]["valid"] == 0].sum() == 0
