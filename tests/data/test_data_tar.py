"""img2dataset tar shards: index, bad members, stats/convert CLIs, pipeline, sharding."""
import json
import os

import numpy as np
import pytest

from tests.data.test_data_pipeline import tiny_config
from vlm_jax.data import BadDataError, split_for, train_iterator
from vlm_jax.data import sources as S
from vlm_jax.data.__main__ import main as cli


def run_cli(capsys, *argv):
    rc = cli(list(argv))
    out = capsys.readouterr()
    assert rc == 0, out.err
    return json.loads(out.out)


def tar_config(pattern, **kw):
    kw.setdefault("n", 20)
    kw.setdefault("eval_n", 5)
    return tiny_config(name="", source="tar", path=pattern, **kw)


def test_brace_patterns(tmp_path):
    assert S.expand_braces("a/{08..10}.tar") == ["a/08.tar", "a/09.tar", "a/10.tar"]
    assert S.expand_braces("{x,y}/{1..2}") == ["x/1", "x/2", "y/1", "y/2"]
    with pytest.raises(FileNotFoundError, match=r"nothing\*\.tar|matches no files"):
        S.expand_pattern(str(tmp_path / "nothing*.tar"))
    with pytest.raises(FileNotFoundError, match="4 of 4 files do not exist.*00000.tar"):
        S.expand_pattern(str(tmp_path / "{00000..00003}.tar"))


def test_stats_counts_every_bad_member(shards, capsys):
    pattern, want = shards
    out = run_cli(capsys, "stats", "--format", "tar", "--path", pattern)
    assert out["samples"] == want["samples"]
    assert out["skipped"] == want["skipped"]
    assert out["records"] == want["records"]
    assert out["samples_per_sec"] > 0
    out = run_cli(capsys, "stats", "--format", "tar", "--path", pattern, "--limit", "7")
    assert out["records"] == 7


def test_stats_cli_missing_pattern(tmp_path, capsys):
    rc = cli(["stats", "--format", "tar", "--path", str(tmp_path / "none-*.tar")])
    err = capsys.readouterr().err
    assert rc == 2 and "none-*.tar" in err and "matches no files" in err


def test_member_names_are_keys_not_paths(shards):
    pattern, _ = shards
    src = S.TarSource(pattern, shuffle_shards=False)
    keys = [src[i]["key"] for i in range(len(src)) if _ok(src, i)]
    assert "../../etc/evil" in keys
    assert not os.path.exists(os.path.join(os.path.dirname(pattern), "..", "..", "etc",
                                           "evil.jpg"))


def _ok(src, i):
    try:
        src[i]
        return True
    except S.BadSample:
        return False


def test_convert_to_arrayrecord_and_read_back(shards, tmp_path, capsys):
    pattern, want = shards
    out_dir = tmp_path / "ar"
    out = run_cli(capsys, "convert", "--from", "tar", "--path", pattern, "--to",
                  "arrayrecord", "--out", str(out_dir), "--records-per-file", "12")
    assert out["samples"] == want["samples"] and out["skipped"] == want["skipped"]
    assert out["files"] == ["part-00000.array_record", "part-00001.array_record",
                            "part-00002.array_record"]
    assert json.loads((out_dir / "stats.json").read_text())["samples"] == out["samples"]
    assert not [f for f in os.listdir(out_dir) if f.endswith(".tmp")]
    st = run_cli(capsys, "stats", "--format", "arrayrecord", "--path",
                 str(out_dir / "*.array_record"))
    assert st["samples"] == want["samples"] and st["skipped"] == {}
    # Same samples as the tar shards, by key and caption.
    ar = S.ArrayRecordSource(str(out_dir / "*.array_record"))
    tar = S.TarSource(pattern, shuffle_shards=False)
    got = {ar[i]["key"]: ar[i]["text"] for i in range(len(ar))}
    for i, sample in S.iter_records(tar):
        if not isinstance(sample, S.BadSample) and sample["key"] in got:
            assert got[sample["key"]] == sample["text"].decode()


def test_tar_pipeline_skips_and_reports(shards):
    pattern, want = shards
    c = tar_config(pattern, n=30, eval_n=5, max_bad_fraction=0.5)
    it = train_iterator(c)
    seen_bad = 0
    for _ in range(8):  # more than one epoch of the 30-record subset
        b = next(it)
        assert b["pixels"].shape == (8, 32, 32, 3) and np.isfinite(b["pixels"]).all()
        seen_bad = sum(int(v) for k, v in b.items() if k.startswith("_skipped/"))
    assert b["_skipped/unreadable_shard"] == 1 and b["_skipped/truncated_shard"] == 1
    assert seen_bad > 2 and b["_epoch"] > 1


@pytest.mark.parametrize("kind,template", [("vlm", "chat"), ("lm", "plain"),
                                           ("clip", "plain")])
def test_chunk_rows_equal_examples_built_one_by_one(shards, kind, template):
    """A chunk (train path: token rows built together) holds exactly the examples that
    LoadExample (eval path) builds one by one, bad samples marked in place; short seq_len
    truncates some captions."""
    from vlm_jax.data import pipeline as P
    pattern, _ = shards
    # Room for 5 caption tokens: "a photo number N" fits, "a key, never a path" does not.
    seq_len = 16 if template == "chat" else 7
    c = P._resolved(tar_config(pattern, kind=kind, template=template, seq_len=seq_len))
    src = S.TarSource(pattern, shuffle_shards=False)
    load = P.LoadExample(src, P.example_transforms(c), kind != "lm")
    items = [(i, i) for i in range(26, 40)]  # the good shard's end + every bad kind
    chunk = P.LoadChunk(load).map(items)
    one = [load.map(item) for item in items]
    got = P.unpack_chunk(chunk)
    assert [isinstance(x, P._Bad) for x in got] == [isinstance(x, P._Bad) for x in one]
    assert sum(isinstance(x, P._Bad) for x in got) == (5 if kind == "lm" else 8)  # lm: no decode
    for g, o in zip(got, one):
        if isinstance(o, P._Bad):
            assert g.reason == o.reason
            continue
        assert set(g) == set(o)
        for k in o:
            np.testing.assert_array_equal(g[k], o[k], err_msg=k)
    assert chunk["rows"]["_truncated"].any() and not chunk["rows"]["_truncated"].all()


def test_bad_fraction_raises_with_counts(shards):
    pattern, _ = shards
    c = tar_config(pattern, n=38, eval_n=2, max_bad_fraction=0.01)
    it = train_iterator(c)
    with pytest.raises(BadDataError, match="max_bad_fraction") as e:
        for _ in range(40):
            next(it)
    assert e.value.counts and e.value.seen >= 100


def test_tar_subsets_nested_lazily_indexed(shards):
    pattern, _ = shards
    src = S.TarSource(pattern, seed=0)
    c1, c2 = tar_config(pattern, n=5, eval_n=3), tar_config(pattern, n=12, eval_n=3)
    s1, s2 = split_for(c1, src), split_for(c2, src)
    assert set(s1.train_records()) < set(s2.train_records())
    assert not set(s2.train_records()) & set(s2.eval_records())
    fresh = S.TarSource(pattern, seed=0)
    split_for(c1, fresh)
    assert len(fresh._index) < len(fresh.shards)  # a small subset reads few shards


def test_tar_two_processes_disjoint_cover(shards):
    pattern = shards[0].replace("{00000..00005}", "{00000..00002}")  # the good shards
    c = tar_config(pattern, n=16, eval_n=4, batch=4)
    c.data.num_threads = 1
    one = train_iterator(c)
    ps = [train_iterator(c, i, 2) for i in range(2)]
    for _ in range(6):  # 24 examples: past the end of the 16-record subset
        full, a, b = next(one), next(ps[0]), next(ps[1])
        np.testing.assert_array_equal(np.concatenate([a["tokens"], b["tokens"]]),
                                      full["tokens"])
        np.testing.assert_array_equal(np.concatenate([a["pixels"], b["pixels"]]),
                                      full["pixels"])
    from vlm_jax.data import record_positions
    r0, r1 = record_positions(c, 4, 0, 2), record_positions(c, 4, 1, 2)
    assert not set(r0.ravel()) & set(r1.ravel())
    assert set(r0.ravel()) | set(r1.ravel()) == set(split_for(c).train_records())


def test_remote_shards_through_fsspec(shards, capsys, tmp_path, monkeypatch):
    """URLs go through fsspec (here its in-memory filesystem): each shard is streamed once
    into the local shard cache and indexed and read there."""
    import glob

    import fsspec
    pattern, want = shards
    cache = tmp_path / "shard_cache"
    monkeypatch.setenv("VLM_JAX_SHARD_CACHE", str(cache))
    fs = fsspec.filesystem("memory")
    root = f"/vlm_test_shards_{os.getpid()}_{tmp_path.name}"  # xdist: one per test run
    for f in glob.glob(os.path.join(os.path.dirname(pattern), "*.tar")):
        fs.pipe(f"{root}/{os.path.basename(f)}", open(f, "rb").read())
    url = f"memory://{root}/{{00000..00005}}.tar"
    out = run_cli(capsys, "stats", "--format", "tar", "--path", url)
    assert (out["samples"], out["skipped"]) == (want["samples"], want["skipped"])
    cached = sorted(os.listdir(cache))
    assert len(cached) == 6 and not [f for f in cached if f.endswith(".tmp")]
    out = run_cli(capsys, "stats", "--format", "tar", "--path", f"memory://{root}/*.tar")
    assert out["samples"] == want["samples"] and sorted(os.listdir(cache)) == cached
    good = url.replace("{00000..00005}", "{00000..00002}")
    c = tar_config(good, n=12, eval_n=4, shard_cache=str(tmp_path / "run_cache"))
    local = tar_config(pattern.replace("{00000..00005}", "{00000..00002}"), n=12, eval_n=4)
    it, ref = train_iterator(c), train_iterator(local)
    # Members are read from the local copies: the remote files are no longer needed.
    for f in fs.ls(root, detail=False):
        fs.rm(f)
    for _ in range(2):
        got, want = next(it), next(ref)
        np.testing.assert_array_equal(got["pixels"], want["pixels"])
        np.testing.assert_array_equal(got["tokens"], want["tokens"])
    with pytest.raises(FileNotFoundError, match="memory://nowhere"):
        S.expand_pattern("memory://nowhere/{0..1}.tar")


def test_shard_cache_is_atomic_and_refetches_partial_copies(shards, tmp_path):
    """A file:// URL takes the remote path too. A cached copy of the wrong size (a crash
    mid-copy from another tool, a changed shard) is fetched again; a failing fetch leaves no
    temporary file and the shard counts as unreadable."""
    pattern, _ = shards
    path = pattern.replace("{00000..00005}", "00000")
    url = "file://" + path
    cache = str(tmp_path / "c")
    dst = S.fetch_shard(url, cache)
    assert open(dst, "rb").read() == open(path, "rb").read()
    with open(dst, "r+b") as f:
        f.truncate(100)
    assert S.fetch_shard(url, cache) == dst and os.path.getsize(dst) == os.path.getsize(path)
    idx = S.index_tar(url, cache)
    assert idx.local == dst and idx.path == url and len(idx) == 10 and not idx.error
    src = S.TarSource(url, cache_dir=cache)
    assert src[3]["source"] == url and src[3]["text"] == b"a photo number 3"
    bad = S.index_tar("file://" + str(tmp_path / "missing.tar"), cache)
    assert bad.error.startswith("unreadable") and len(bad) == 0
    assert not [f for f in os.listdir(cache) if f.endswith(".tmp")]
