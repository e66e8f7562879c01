"""LLM conversion parity against transformers (fp32, max abs diff <= 1e-4), layouts,
round trip, and bad-input errors."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tests.convert import hf_tiny
from vlm_jax import convert
from vlm_jax.convert import safetensors_io as st
from vlm_jax.convert.layout import unstack_layers

TOL = 1e-4
IDS = np.random.default_rng(0).integers(3, 1000, (2, 12))
MASK = np.array([[1] * 12, [1] * 9 + [0] * 3])   # right padding in row 1


def hf_logits(m, ids=IDS, mask=MASK):
    with torch.no_grad():
        out = m(torch.tensor(ids), attention_mask=torch.tensor(mask), output_hidden_states=True)
    return out.logits.numpy(), out.hidden_states[-1].numpy()


def ours(mod, params, ids=IDS, mask=MASK):
    seg = jnp.asarray(mask, jnp.int32)
    f = jax.jit(lambda p, i, s: mod.apply({"params": p}, i, segment_ids=s))
    return np.asarray(f(params, jnp.asarray(ids), seg))


def check(mod, params, m, mask=MASK):
    ref, _ = hf_logits(m, mask=mask)
    got = ours(mod, params, mask=mask)
    valid = mask.astype(bool)
    assert np.abs(got[valid] - ref[valid]).max() <= TOL


def test_llama_gqa_odd_sizes_both_layouts(tmp_path):
    m = hf_tiny.llama(tmp_path)
    mod, params = convert.load_hf_llm(str(tmp_path))
    assert mod.cfg.head_dim == 48 and mod.cfg.kv_heads == 1 and mod.cfg.rope_theta == 5e5
    # Logits and final hidden states (transformers' last hidden state is after the final
    # norm) from one compiled program.
    hidden = lambda md, i, segment_ids: md.decode(md.embed(i), None, segment_ids)
    f = jax.jit(lambda p, i, s: (mod.apply({"params": p}, i, segment_ids=s),
                                 mod.apply({"params": p}, i, segment_ids=s, method=hidden)))
    logits, h = f(params, jnp.asarray(IDS), jnp.asarray(MASK, jnp.int32))
    ref, ref_h = hf_logits(m)
    valid = MASK > 0
    assert np.abs(np.asarray(logits)[valid] - ref[valid]).max() <= TOL
    assert np.abs(np.asarray(h)[valid] - ref_h[valid]).max() <= TOL
    # The unscanned layout holds the same tensors, one subtree per layer (that the model
    # computes the same either way is tests/models' scan == unscanned check).
    mod_u, params_u = convert.load_hf_llm(str(tmp_path), scan_layers=False)
    assert not mod_u.cfg.scan_layers and "layers_2" in params_u and "layers" not in params_u
    assert jax.tree.structure(params_u) == jax.tree.structure(unstack_layers(params))
    jax.tree.map(np.testing.assert_array_equal, params_u, unstack_layers(params))


@pytest.mark.parametrize("scaling", [{"rope_type": "linear", "factor": 2.0},
                                     {"rope_type": "dynamic", "factor": 3.0}])
def test_llama_tied_rope_scaling(tmp_path, scaling):
    # max_position_embeddings 8 < 12 tokens: dynamic scaling is active.
    m = hf_tiny.llama(tmp_path, tie_word_embeddings=True, rope_parameters=dict(
        scaling, rope_theta=10000.0), max_position_embeddings=8, num_attention_heads=2, num_key_value_heads=2)
    mod, params = convert.load_hf_llm(str(tmp_path))
    assert mod.cfg.tie_embeddings and "lm_head" not in params
    assert mod.cfg.rope_scaling.rope_type == scaling["rope_type"]
    check(mod, params, m, mask=np.ones_like(MASK))


def test_qwen2_bias_tied_sharded(tmp_path):
    from transformers import Qwen2ForCausalLM
    m = hf_tiny.qwen2(tmp_path / "a")
    m.save_pretrained(tmp_path / "b", max_shard_size="60KB")
    assert os.path.exists(tmp_path / "b" / st.INDEX)
    mod, params = convert.load_hf_llm(str(tmp_path / "b"))
    assert mod.cfg.qkv_bias and mod.cfg.tie_embeddings
    check(mod, params, m)
    assert isinstance(m, Qwen2ForCausalLM)


def test_internlm2_layout(tmp_path):
    m = hf_tiny.llama(tmp_path / "llama", num_attention_heads=4, num_key_value_heads=2,
                      head_dim=24)
    hf_tiny.internlm2_from_llama(tmp_path / "llama", tmp_path / "internlm2")
    mod, params = convert.load_hf_llm(str(tmp_path / "internlm2"))
    check(mod, params, m)
    # Round trip in the InternLM2 layout is bit-exact.
    meta = convert.convert(str(tmp_path / "internlm2"), str(tmp_path / "conv"))
    assert meta["arch"] == "internlm2"
    convert.export_hf(str(tmp_path / "conv"), str(tmp_path / "back"))
    assert_same_tensors(tmp_path / "internlm2", tmp_path / "back")


def assert_same_tensors(a, b):
    ra, rb = st.Reader(str(a)), st.Reader(str(b))
    assert sorted(ra.keys()) == sorted(rb.keys())
    for k in ra.keys():
        x, y = ra.read(k), rb.read(k)
        assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes(), k


def cli(capsys, *args):
    """`python -m vlm_jax.convert ARGS` in this process (same entry point, no re-import)."""
    from vlm_jax.convert.__main__ import main
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_round_trip_bf16_bit_exact_sharded(tmp_path, capsys):
    from transformers import LlamaForCausalLM
    m = hf_tiny.llama(tmp_path / "hf")
    m.to(torch.bfloat16).save_pretrained(tmp_path / "hf16")
    rc, out, err = cli(capsys, "--hf", tmp_path / "hf16", "--out", tmp_path / "ck")
    assert rc == 0, err
    info = json.loads(out.strip().splitlines()[-1])
    assert info["part"] == "llm" and info["arch"] == "llama"
    assert os.path.exists(tmp_path / "ck" / "vlm_jax_convert.json")
    # Existing output is never clobbered without --force.
    rc, _, err = cli(capsys, "--hf", tmp_path / "hf16", "--out", tmp_path / "ck")
    assert rc == 2 and "--force" in err
    # A bad shard size fails before anything is written.
    rc, _, err = cli(capsys, "--to-hf", tmp_path / "ck", "--out", tmp_path / "x",
                     "--max-shard-size", "5XB")
    assert rc == 2 and "--max-shard-size" in err and not os.path.exists(tmp_path / "x")
    # Export in shards of <= 60 KB (the 192 KB embedding gets a shard of its own).
    rc, _, err = cli(capsys, "--to-hf", tmp_path / "ck", "--out", tmp_path / "back",
                     "--max-shard-size", "60KB")
    assert rc == 0, err
    index = json.load(open(tmp_path / "back" / st.INDEX))
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert sorted(os.listdir(tmp_path / "back")) == sorted(shards + [st.INDEX, "config.json"])
    umask = os.umask(0)
    os.umask(umask)
    for d in ("back", "ck"):   # outputs get the user's usual permissions, not a temp dir's
        assert os.stat(tmp_path / d).st_mode & 0o777 == 0o777 & ~umask
    for f in shards:
        h = st.read_header(str(tmp_path / "back" / f))
        size = sum(v["data_offsets"][1] - v["data_offsets"][0] for v in h.values())
        assert size <= 60_000 or len(h) == 1, (f, size)
    assert index["metadata"]["total_size"] == sum(
        st.Reader(str(tmp_path / "hf16")).read(k).nbytes for k in index["weight_map"])
    assert_same_tensors(tmp_path / "hf16", tmp_path / "back")
    again = LlamaForCausalLM.from_pretrained(tmp_path / "back", dtype=torch.float32)
    ref = LlamaForCausalLM.from_pretrained(tmp_path / "hf16", dtype=torch.float32)
    with torch.no_grad():
        np.testing.assert_array_equal(again(torch.tensor(IDS)).logits.numpy(),
                                      ref(torch.tensor(IDS)).logits.numpy())
    # --dtype casts on export (one file: below the default 5GB).
    convert.export_hf(str(tmp_path / "ck"), str(tmp_path / "f32"), dtype="float32")
    assert os.listdir(tmp_path / "f32") != [] and not os.path.exists(tmp_path / "f32" / st.INDEX)
    r16, r32 = st.Reader(str(tmp_path / "hf16")), st.Reader(str(tmp_path / "f32"))
    for k in r16.keys():
        np.testing.assert_array_equal(r32.read(k), r16.read(k).astype(np.float32))
    # load_pretrained reads the converted dir (dtype cast) and the HF dir alike.
    over, p1 = convert.load_pretrained("llm", str(tmp_path / "ck"), dtype="float32")
    over2, p2 = convert.load_pretrained("llm", str(tmp_path / "hf16"), dtype="float32")
    assert over == json.loads(json.dumps(over2))
    jax.tree.map(np.testing.assert_array_equal, p1, p2)
    with pytest.raises(convert.ConversionError, match="converted 'llm'"):
        convert.load_pretrained("vision", str(tmp_path / "ck"))


def test_shard_plan_and_sizes():
    assert st.parse_size("5GB") == 5 * 10 ** 9 and st.parse_size("2MiB") == 2 * 2 ** 20
    assert st.parse_size(" 1.5 kb ") == 1500 and st.parse_size(123) == 123
    for bad in ("5XB", "GB", "-1", 0):
        with pytest.raises(convert.ConversionError, match="max_shard_size"):
            st.parse_size(bad)
    f32 = np.dtype(np.float32)
    specs = [("a", (10,), f32), ("b", (10,), f32), ("c", (30,), f32), ("d", (5,), f32)]
    plan = st.plan_shards(specs, 80)   # 40 + 40 bytes fit; c (120) alone; d (20) next
    assert [[s[0] for s in sh] for sh in plan] == [["a", "b"], ["c"], ["d"]]


def _edit_config(path, **kw):
    p = os.path.join(path, "config.json")
    c = json.load(open(p))
    c.update(kw)
    json.dump(c, open(p, "w"))


def test_bad_inputs_name_file_and_key(tmp_path):
    hf_tiny.llama(tmp_path / "ok", num_hidden_layers=1)
    with pytest.raises(convert.ConversionError, match="config.json: file not found"):
        convert.load_hf_llm(str(tmp_path / "nothing"))
    r = st.Reader(str(tmp_path / "ok"))
    tensors = {k: r.read(k) for k in r.keys()}
    bad = tmp_path / "bad"

    def write(t, **cfg):
        os.makedirs(bad, exist_ok=True)
        st.write(str(bad / "model.safetensors"), t)
        json.dump(dict(json.load(open(tmp_path / "ok" / "config.json")), **cfg),
                  open(bad / "config.json", "w"))

    write(tensors, model_type="gpt2", architectures=["GPT2LMHeadModel"])
    with pytest.raises(convert.ConversionError, match="unsupported LLM architecture.*gpt2"):
        convert.load_hf_llm(str(bad))
    key = "model.layers.0.mlp.up_proj.weight"
    write({k: v for k, v in tensors.items() if k != key})
    with pytest.raises(convert.ConversionError, match=f"model.safetensors: missing tensor '{key}'"):
        convert.load_hf_llm(str(bad))
    write(dict(tensors, **{"model.layers.1.mlp.up_proj.weight": tensors[key]}))
    with pytest.raises(convert.ConversionError, match="unexpected tensor.*layers.1.mlp.up_proj"):
        convert.load_hf_llm(str(bad))
    write(tensors, intermediate_size=128)
    with pytest.raises(convert.ConversionError,
                       match=r"model.safetensors: tensor 'model.layers.0.mlp.gate_proj.weight'"
                             r" of shape \(160, 96\).*expects \(128, 96\)"):
        convert.load_hf_llm(str(bad))
    with open(bad / "model.safetensors", "r+b") as f:  # truncated file
        f.truncate(os.path.getsize(bad / "model.safetensors") - 100)
    with pytest.raises(convert.ConversionError, match="truncated"):
        convert.load_hf_llm(str(bad))
    # A failed conversion leaves no output and no temp dir behind.
    with pytest.raises(convert.ConversionError):
        convert.convert(str(bad), str(tmp_path / "out"), part="llm")
    assert not any(p.name.startswith("out") for p in tmp_path.iterdir())
