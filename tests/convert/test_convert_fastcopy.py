"""Host copies and reads (arrays.py, Reader.read_into) against numpy, the read and
mapped load paths, and the converter's peak memory."""
import gc
import json
import os

import jax
import ml_dtypes
import numpy as np
import pytest

from vlm_jax import convert
from vlm_jax.convert import arrays
from vlm_jax.convert import mapping as M
from vlm_jax.convert import safetensors_io as st

DTYPES = (ml_dtypes.bfloat16, np.float32, np.float16, ml_dtypes.float8_e4m3fn, np.float64)


def views(a):
    """Views the converter copies or exports: head splits, row blocks, odd slices."""
    r, c = a.shape
    out = [a, a[:, ::2], a[1:, 3:], a.T]
    if r % 4 == 0:
        out.append(M.heads(4)[0](a))         # [4, r/4, c]
        out.append(a.reshape(2, 2, r // 4, c)[:, :1])   # InternLM2-style row blocks
    if c % 4 == 0:
        out.append(M.heads_last(4)[0](a))    # [r, 4, c/4]
    return out


def test_copy_into_matches_numpy_bit_exact():
    rng = np.random.default_rng(0)
    for dt in DTYPES:
        for shape in ((600, 520), (96, 160), (37, 300), (8, 3)):
            a = rng.standard_normal(shape).astype(dt)
            for v in views(a):
                d = arrays.empty(v.shape, v.dtype)
                arrays.copy_into(d, v)
                assert d.tobytes() == np.ascontiguousarray(v).tobytes(), (dt, shape, v.strides)
                c = arrays.contiguous(v, np.float32)       # with a cast
                assert c.flags.c_contiguous and c.dtype == np.float32
                np.testing.assert_array_equal(c, v.astype(np.float32))
    nan = np.array([0x7fc1, 0xffc3, 0x7f81], np.uint16).view(ml_dtypes.bfloat16)
    d = np.empty(3, ml_dtypes.bfloat16)
    arrays.copy_into(d, nan)                                # NaN payloads survive
    assert d.view(np.uint16).tolist() == nan.view(np.uint16).tolist()
    big = arrays.empty((1024, 1024), np.float32)           # an anonymous mmap
    big[...] = 3
    assert big.sum() == 3 * 2 ** 20 and arrays.contiguous(big) is big
    with pytest.raises(ValueError, match="shape"):
        arrays.copy_into(np.empty((3, 2)), np.empty((2, 3)))
    arrays.prefault(big[300:700])                           # prefault keeps the contents
    assert big.sum() == 3 * 2 ** 20
    fresh = arrays.empty((64, 2 ** 18), np.float32)         # 64 MiB, no page touched yet
    before = _rss_kib()[0]
    arrays.prefault(fresh[1:])                              # odd offset: whole pages
    if arrays._madvise is not False:                        # Linux >= 5.14
        assert _rss_kib()[0] - before > 60 * 1024


def test_read_into_reads_any_reshape_and_checks(tmp_path):
    rng = np.random.default_rng(2)
    t = {"a": rng.standard_normal((6, 10)).astype(ml_dtypes.bfloat16),
         "b": rng.standard_normal((3,)).astype(np.float32)}
    st.write(str(tmp_path / "x.safetensors"), t)
    r = st.Reader(str(tmp_path / "x.safetensors"))
    out = np.empty((2, 3, 10), ml_dtypes.bfloat16)
    r.read_into("a", out)
    assert out.tobytes() == t["a"].tobytes()
    np.testing.assert_array_equal(r.read("b"), t["b"])
    for bad in (np.empty((6, 10), np.float32), np.empty((6, 9), ml_dtypes.bfloat16),
                np.empty((10, 6), ml_dtypes.bfloat16).T):
        with pytest.raises(ValueError, match="read_into"):
            r.read_into("a", bad)
    raw = (tmp_path / "x.safetensors").read_bytes()
    (tmp_path / "x.safetensors").write_bytes(raw[:-4])       # truncated after the header check
    with pytest.raises(st.ConversionError, match="truncated inside tensor 'b'"):
        r.read_into("b", np.empty(3, np.float32))


def write_llama(path, vocab=4096, d=512, mlp=1024, layers=8, heads=8, kv=4):
    """A random bf16 Llama checkpoint written with numpy (~46 MB at the defaults)."""
    rng = np.random.default_rng(0)
    hd = d // heads
    shapes = {"model.embed_tokens.weight": (vocab, d), "model.norm.weight": (d,),
              "lm_head.weight": (vocab, d)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (heads * hd, d),
                       p + "self_attn.k_proj.weight": (kv * hd, d),
                       p + "self_attn.v_proj.weight": (kv * hd, d),
                       p + "self_attn.o_proj.weight": (d, heads * hd),
                       p + "mlp.gate_proj.weight": (mlp, d), p + "mlp.up_proj.weight": (mlp, d),
                       p + "mlp.down_proj.weight": (d, mlp),
                       p + "input_layernorm.weight": (d,),
                       p + "post_attention_layernorm.weight": (d,)})
    tensors = {k: rng.integers(0x3c00, 0x3f80, s, dtype=np.uint16).view(ml_dtypes.bfloat16)
               for k, s in shapes.items()}
    os.makedirs(path)
    st.write(os.path.join(path, st.SINGLE), tensors)
    json.dump({"model_type": "llama", "architectures": ["LlamaForCausalLM"],
               "vocab_size": vocab, "hidden_size": d, "intermediate_size": mlp,
               "num_hidden_layers": layers, "num_attention_heads": heads,
               "num_key_value_heads": kv, "max_position_embeddings": 128},
              open(os.path.join(path, "config.json"), "w"))
    return sum(t.nbytes for t in tensors.values())


def _rss_kib():
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return int(status["VmRSS"].split()[0]), int(status["VmHWM"].split()[0])


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK),
                    reason="needs Linux /proc/self/clear_refs to reset the peak RSS")
def test_convert_peak_memory_near_one_copy(tmp_path):
    """`convert` (read + orbax save) holds about one copy of the weights: orbax's default
    numpy save (deep copies + compression buffers) would add ~1.8x on top."""
    small = write_llama(tmp_path / "small", vocab=256, d=64, mlp=128, layers=2)
    convert.convert(str(tmp_path / "small"), str(tmp_path / "warm"))   # one-time inits
    nbytes = write_llama(tmp_path / "hf")
    assert nbytes > 40e6 and small < 1e6
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                                    # VmHWM := VmRSS
    base, _ = _rss_kib()
    unclosed = st.Reader.unclosed
    convert.convert(str(tmp_path / "hf"), str(tmp_path / "ck"))
    _, peak = _rss_kib()
    assert st.Reader.unclosed == unclosed   # every tensor's mapping was closed after use
    extra = (peak - base) * 1024 / nbytes
    assert extra <= 1.3, f"peak RSS grew by {extra:.2f}x the checkpoint bytes"
    # The dir restores to the same tensors as a direct read.
    _, params = convert.load_converted(str(tmp_path / "ck"))
    _, direct, _ = convert.api.convert_llm(str(tmp_path / "hf"))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a.view(np.uint16),
                                                            b.view(np.uint16)), params, direct)


def test_threaded_load_bit_exact_and_fails_before_reading(tmp_path, monkeypatch):
    """Loading on several threads gives the single-threaded result bit for bit, and a
    config that does not match the weights is refused before any tensor is read."""
    write_llama(tmp_path / "hf", vocab=250, d=72, mlp=100, layers=3, heads=3, kv=1)
    got = {}
    for n in (1, 3):
        monkeypatch.setattr(M, "default_threads", lambda n=n: n)
        _, got[n], _ = convert.api.convert_llm(str(tmp_path / "hf"))
    ref = st.Reader(str(tmp_path / "hf"))
    want = ref.read("model.layers.2.mlp.down_proj.weight")   # torch's layout: as stored
    np.testing.assert_array_equal(got[3]["layers"]["mlp"]["down"]["kernel"][2].view(np.uint16),
                                  want.view(np.uint16))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a.view(np.uint16),
                                                            b.view(np.uint16)), got[1], got[3])
    cfg = json.load(open(tmp_path / "hf" / "config.json"))
    json.dump(dict(cfg, intermediate_size=96), open(tmp_path / "hf" / "config.json", "w"))
    touched = []
    for name in ("mapped", "read_into"):
        orig = getattr(st.Reader, name)
        monkeypatch.setattr(st.Reader, name, lambda self, k, *a, orig=orig:
                            touched.append(k) or orig(self, k, *a))
    with pytest.raises(st.ConversionError, match=r"gate_proj.weight' of shape \(100, 72\)"):
        convert.api.convert_llm(str(tmp_path / "hf"))
    assert touched == []


def test_read_and_mapped_load_paths_bit_identical(tmp_path, monkeypatch):
    """Entries that are reshapes are read straight into their leaves (no file mapped);
    with read=False, or a cast, the same tensors come through mappings, bit for bit."""
    from vlm_jax.convert import hf_llm
    from vlm_jax.models.llm import param_shapes
    write_llama(tmp_path / "hf", vocab=250, d=72, mlp=100, layers=2, heads=3, kv=1)
    over = hf_llm.config_overrides(json.load(open(tmp_path / "hf" / "config.json")))
    cfg = convert.api._llm_module(over, True)[0]
    reader = st.Reader(str(tmp_path / "hf"))
    entries = hf_llm.entries(cfg, "llama")
    assert all(e.plain for e in entries)
    mapped = []
    orig = st.Reader.mapped
    monkeypatch.setattr(st.Reader, "mapped", lambda self, k: mapped.append(k) or orig(self, k))
    got = {r: M.load(reader, entries, param_shapes(cfg), True, read=r, threads=2)
           for r in (True, False)}
    assert len(mapped) == len(entries)                  # only read=False mapped the files
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a.view(np.uint16),
                                                            b.view(np.uint16)), *got.values())
    q = reader.read("model.layers.1.self_attn.q_proj.weight").reshape(3, 24, 72)
    assert got[True]["layers"]["attn"]["q"]["kernel"][1].tobytes() == q.tobytes()
    f32 = M.load(reader, entries, param_shapes(cfg), True, np.float32)   # cast: mapped
    assert len(mapped) == 2 * len(entries)
    np.testing.assert_array_equal(f32["layers"]["attn"]["q"]["kernel"][1], q.astype(np.float32))
