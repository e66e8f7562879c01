"""Frozen-feature cache: the store, its key, and cached run == uncached run."""
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from configs import demo
from vlm_jax.train import feature_cache as fc


def _cfg(arg="", **train):
    c = demo.get_config("run,vit=S,llm=S,n=32,steps=2,batch=8,eval_n=8," + arg)
    c.train.log_every_steps = 1
    c.train.update(train)
    return c


def test_store_roundtrip_atomic_and_bf16(tmp_path):
    st = fc.FeatureStore(str(tmp_path), "k", {"a": 1})
    assert len(st) == 0 and st.missing(np.array([3, 1, 3])).tolist() == [1, 3]
    f = np.random.RandomState(0).randn(3, 4, 5).astype(np.float32)
    st.add(np.array([7, 2, 9]), f, bad={4: "decode_error"})
    st.add(np.array([11]), f[:1])
    again = fc.FeatureStore(str(tmp_path), "k")          # a fresh reader sees both shards
    assert len(again) == 4 and again.missing(np.array([2, 4, 5, 11])).tolist() == [5]
    marks = again.bad_records()
    assert len(marks) == 1 and marks.reason(4) == "decode_error" and marks.reason(7) is None
    assert marks.any_of([9, 4]) and not marks.any_of([5, 11, 3])
    none = fc.FeatureStore(str(tmp_path), "empty").bad_records()
    assert len(none) == 0 and none.reason(4) is None and not none.any_of([4])
    got = again.gather(np.array([9, -1, 2, 11, 7]))
    np.testing.assert_array_equal(got[0], f[2])
    np.testing.assert_array_equal(got[1], 0)               # padding rows
    np.testing.assert_array_equal(got[2], f[1])
    np.testing.assert_array_equal(got[3], f[0])
    assert not [n for n in os.listdir(tmp_path / "k") if n.startswith(".")]  # no temp left
    with pytest.raises(fc.FeatureCacheError, match="no features for records"):
        again.gather(np.array([5]))
    with pytest.raises(fc.FeatureCacheError, match="delete it"):
        again.add(np.array([1]), np.zeros((1, 4, 6), np.float32))
    bf = fc.FeatureStore(str(tmp_path), "b")
    x = jnp.asarray(f).astype(jnp.bfloat16)
    bf.add(np.array([0, 1, 2]), np.asarray(x))
    out = fc.FeatureStore(str(tmp_path), "b").gather(np.array([2, 0]))
    assert out.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(x, np.float32)[[2, 0]])


def test_key_invalidation(tmp_path):
    base = fc.cache_key(_cfg())
    same = [_cfg("llm=M"), _cfg("n=16"), _cfg("eval_n=16"), _cfg("steps=5"),
            _cfg("data=noisy")]
    for c in same:   # LLM size, data size, eval size, steps, captions: same features
        assert fc.cache_key(c) == base
    # the noisy variant shares the store because its images are the clean ones
    from vlm_jax.data import pipeline
    idx = np.arange(0, 64, 7)
    clean, noisy = (pipeline.source_for(_cfg(a)).get_batch(idx) for a in ("", "data=noisy"))
    np.testing.assert_array_equal(clean["image"], noisy["image"])
    assert list(clean["text"]) != list(noisy["text"])
    c = _cfg()
    c.model.vision.scan_layers = True                     # execution only
    assert fc.cache_key(c) == base
    changed = [_cfg("vit=M")]
    for field, value in [("feature_layer", -1), ("feature_select", "cls_patch"),
                         ("image_size", 48)]:
        c = _cfg()
        c.model.vision[field] = value
        changed.append(c)
    c = _cfg()
    c.data.seed = 3
    changed.append(c)
    c = _cfg()
    c.model.frozen_dtype = "bfloat16"
    changed.append(c)
    c = _cfg()
    c.train.seed = 1                                      # random-init encoder: seed matters
    changed.append(c)
    keys = [fc.cache_key(c) for c in changed]
    assert base not in keys and len(set(keys)) == len(keys)
    # init_from identity: a rewritten checkpoint is a new key
    ck = tmp_path / "vit"
    ck.mkdir()
    (ck / "model.safetensors").write_bytes(b"x" * 10)
    c = _cfg()
    c.model.vision.init_from = str(ck)
    k1 = fc.cache_key(c)
    (ck / "model.safetensors").write_bytes(b"y" * 11)
    assert fc.cache_key(c) != k1
    c.train.seed = 5                                      # pretrained encoder: seed does not
    assert fc.cache_key(c) == fc.cache_key(c)


def _losses(workdir):
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return ([r["train/loss"] for r in rows if "train/loss" in r],
            [r["eval/loss"] for r in rows if "eval/loss" in r])


def test_cached_run_equals_uncached_and_reuses(tmp_path):
    from vlm_jax.train import trainer
    cache = str(tmp_path / "cache")
    trainer.Run(_cfg(feature_cache=False), str(tmp_path / "plain")).train()
    r = trainer.Run(_cfg(feature_cache=True, feature_cache_dir=cache), str(tmp_path / "fc"))
    res = r.train()
    info = r.feature_cache_info
    assert info["computed"] == 32 + 8 and info["reused"] == 0
    assert res["params/vision"] > 0 and res["images_seen"] == res["examples_seen"] > 0
    (tl0, el0), (tl1, el1) = _losses(tmp_path / "plain"), _losses(tmp_path / "fc")
    assert len(tl0) == 2 and len(el0) == 1
    np.testing.assert_allclose(tl1, tl0, rtol=1e-5)
    np.testing.assert_allclose(el1, el0, rtol=1e-5)
    # another LLM on a nested smaller subset: same key, every record it reads is cached
    small = _cfg("llm=M,n=16", feature_cache=True, feature_cache_dir=cache)
    store = fc.open_store(small, str(tmp_path / "fc2"))
    assert store.key == info["key"] and len(store) == 40
    assert len(store.missing(fc.needed_records(small))) == 0
    assert len(os.listdir(os.path.join(cache, info["key"]))) == 2  # meta + one shard


def test_trainable_encoder_is_refused():
    with pytest.raises(fc.FeatureCacheError, match="optim.trainable"):
        fc.check_usable(_cfg(), ["vision", "projector"])
    c = _cfg()
    c.model.kind = "lm"
    with pytest.raises(fc.FeatureCacheError, match="model.kind"):
        fc.check_usable(c, ["llm"])


def test_image_batches_batched_source_equals_per_record(monkeypatch):
    """The encoder's images come from the source's vectorised `get_batch` when it has one;
    they equal the per-record pipeline path, bad samples included (named and skipped)."""
    from vlm_jax.data import pipeline
    from vlm_jax.data.errors import BadSample
    cfg = _cfg("data=noisy")
    records = np.array([5, 0, 17, 3, 9, 11, 2], np.int64)
    batched = list(fc._image_batches(cfg, records, 3))
    real = pipeline.source_for

    class PerRecord:   # the same source without get_batch
        def __init__(self, src, bad=()):
            self.src, self.bad = src, set(bad)

        def __len__(self):
            return len(self.src)

        def __getitem__(self, i):
            if i in self.bad:
                raise BadSample("missing_image")
            return self.src[i]

    monkeypatch.setattr(pipeline, "source_for", lambda c, *a: PerRecord(real(c, *a)))
    per_record = list(fc._image_batches(cfg, records, 3))
    assert len(batched) == len(per_record) == 3
    for (g0, p0, b0), (g1, p1, b1) in zip(batched, per_record):
        np.testing.assert_array_equal(g0, g1)
        np.testing.assert_array_equal(p0, p1)
        assert b0 == b1 == {}

    class Batched(PerRecord):  # a chunk with a bad sample fails as a whole
        def get_batch(self, idx):
            if self.bad & set(np.asarray(idx).tolist()):
                raise BadSample("missing_image")
            return self.src.get_batch(idx)

    for kind in (PerRecord, Batched):
        monkeypatch.setattr(pipeline, "source_for", lambda c, *a: kind(real(c, *a), {17}))
        out = list(fc._image_batches(cfg, records, 3))
        assert list(np.concatenate([g for g, _, _ in out])) == [5, 0, 3, 9, 11, 2]
        assert {k: v for _, _, b in out for k, v in b.items()} == {17: "missing_image"}
        np.testing.assert_array_equal(out[0][1], batched[0][1][:2])   # 5, 0 of 5, 0, 17


class _BadImages:
    """The synthetic source whose records `bad` have an image the decoder rejects: only a
    reader of images can tell (as with a corrupt JPEG in a tar shard)."""

    def __init__(self, src, bad, batched):
        self.src, self.bad = src, set(bad) if src.with_image else set()
        if batched:
            self.get_batch = self._get_batch

    def __len__(self):
        return len(self.src)

    def __getattr__(self, name):   # order, with_image, ... (get_batch only when batched)
        if name == "get_batch":
            raise AttributeError(name)
        return getattr(self.src, name)

    def __getitem__(self, i):
        from vlm_jax.data.errors import BadSample
        if i in self.bad:
            raise BadSample("decode_error", f"record {i}")
        return self.src[i]

    def _get_batch(self, idx):
        from vlm_jax.data.errors import BadSample
        if self.bad & set(np.asarray(idx).tolist()):
            raise BadSample("decode_error")
        return self.src.get_batch(idx)


@pytest.mark.parametrize("batched", [True, False])
def test_batches_without_images_equal_the_image_path(monkeypatch, batched):
    """With the cache's bad marks, the pipeline reads no image (the source opened without
    images) and gives the image path's batches without `pixels`: same rows, skip counters
    and iterator state, train and eval, also after a restore."""
    from vlm_jax.data import pipeline
    real = pipeline.source_for
    bad = {3: "decode_error", 17: "decode_error", 30: "decode_error", 41: "decode_error"}
    opened = []

    def source_for(c, with_image=None):
        src = real(c, with_image)
        opened.append(src.with_image)
        return _BadImages(src, bad, batched)

    monkeypatch.setattr(pipeline, "source_for", source_for)
    cfg = _cfg("n=48,eval_n=24")
    marks = pipeline.BadRecords(list(bad), list(bad.values()))
    with_img, without = pipeline.train_iterator(cfg), pipeline.train_iterator(cfg, no_images=marks)
    assert opened == [True, False]
    after = []
    for step in range(9):        # past the end of the 48-record subset: a second epoch
        a, b = next(with_img), next(without)
        assert "pixels" in a and "pixels" not in b and set(a) - {"pixels"} == set(b)
        for k in b:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
        if step == 4:
            state = without.get_state()
            assert state == with_img.get_state()
        elif step > 4:
            after.append(b["tokens"])
    assert int(a["_skipped/decode_error"]) == 2     # train records 24..71: 30 and 41
    again = pipeline.train_iterator(cfg, no_images=marks)
    again.set_state(state)
    for tokens in after:
        np.testing.assert_array_equal(next(again)["tokens"], tokens)
    ev_img = list(pipeline.eval_batches(cfg))
    ev = list(pipeline.eval_batches(cfg, no_images=marks))
    assert len(ev) == len(ev_img) > 0 and int(ev[-1]["_skipped/decode_error"]) == 2
    for a, b in zip(ev_img, ev):
        assert set(a) - {"pixels"} == set(b)
        for k in b:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_cached_run_reads_no_images_and_equals_uncached_with_bad_samples(tmp_path,
                                                                         monkeypatch):
    """A cached run over data with undecodable images: the cache marks them bad when it
    computes the features; a run on the filled cache reads no image at all, and its
    losses and skip counts equal the uncached run's."""
    from vlm_jax.data import pipeline
    from vlm_jax.train import trainer
    real = pipeline.source_for
    image_reads = []

    class Counting(_BadImages):
        def __getitem__(self, i):
            if self.src.with_image:
                image_reads.append(i)
            return super().__getitem__(i)

        def _get_batch(self, idx):
            if self.src.with_image:
                image_reads.extend(np.asarray(idx).tolist())
            return super()._get_batch(idx)

    read = int(pipeline.record_positions(_cfg(), 1)[0, 3])   # a train record of step 1
    monkeypatch.setattr(pipeline, "source_for",
                        lambda c, with_image=None: Counting(real(c, with_image), {1, read}, True))
    trainer.Run(_cfg(feature_cache=False), str(tmp_path / "plain")).train()
    cached = dict(feature_cache=True, feature_cache_dir=str(tmp_path / "c"))
    r = trainer.Run(_cfg(**cached), str(tmp_path / "fill"))
    r.train()
    marks = fc.open_store(r.config, r.workdir).bad_records()
    assert len(marks) == 2 and marks.reason(1) == marks.reason(read) == "decode_error"
    image_reads.clear()
    res = trainer.Run(_cfg(**cached), str(tmp_path / "fc")).train()
    assert image_reads == []
    plain = json.load(open(tmp_path / "plain" / "result.json"))
    # record 1 is in the eval split (0..7)
    assert res["data/skipped"] == plain["data/skipped"]
    assert plain["data/skipped"]["decode_error"] == 1
    for wd in ("fill", "fc"):
        (tl0, el0), (tl1, el1) = _losses(tmp_path / "plain"), _losses(tmp_path / wd)
        np.testing.assert_allclose(tl1, tl0, rtol=1e-5)
        np.testing.assert_allclose(el1, el0, rtol=1e-5)
