"""NativeVLM: packed == unpacked per sample, connector, a few train steps lower the loss."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import native as cn
from vlm_jax.data import native as dn
from vlm_jax.data.tokenizer import load_tokenizer
from vlm_jax.models import build_model, batch_spec
from tests.compiled import fast, run_fast
from vlm_jax.models.native import NativeVLM, init_params, merge_visual, param_counts


def _config(impl="chunked:16"):
    c = cn.get_config("demo_run,llm=t64,vit=e32")
    c.model.llm.expert_impl = impl
    c.model.llm.scan_layers = True
    return c


@pytest.fixture(scope="module")
def setup():
    c = _config()
    tok = load_tokenizer("synthetic")
    spec = dn.spec_from_config(c, tok)
    exs = list(dn.synthetic_examples(spec, tok.encode, 6, seed=3, sizes=(32, 64, 96)))
    model = NativeVLM(c.model)
    packed = dn.pack(exs, spec, rows=2)[0]
    # one cheap compile (as the trainer inits) instead of op-by-op dispatch
    base = run_fast(lambda b: init_params(model, jax.random.PRNGKey(0), b), packed)
    # distinct visual experts, so routing mistakes would show
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: x * 1.5 if "visual_" in jax.tree_util.keystr(p) else x, base)
    return c, spec, exs, model, params, base


def test_packed_equals_unpacked_per_sample(setup):
    c, spec, exs, model, params, _ = setup
    packed = dn.pack(exs, spec, rows=2)
    assert len(packed) == 1 and packed[0]["segment_ids"].max() >= 2  # really packed
    padded = dn.pack(exs, dataclasses.replace(spec, packing=False), rows=len(exs))[0]
    f = lambda b: model.apply({"params": params}, b, method=NativeVLM.logits)  # noqa: E731
    lp, lu = np.asarray(run_fast(f, packed[0])), np.asarray(run_fast(f, padded))
    for i, ex in enumerate(exs):
        n = len(ex["tokens"])
        # find example i in the packed batch
        hits = [(r, s) for r in range(2) for s in range(1, 10)
                if (packed[0]["segment_ids"][r] == s).sum() == n
                and (packed[0]["tokens"][r][packed[0]["segment_ids"][r] == s]
                     == ex["tokens"]).all()]
        assert hits, i
        r, s = hits[0]
        got = lp[r][packed[0]["segment_ids"][r] == s]
        np.testing.assert_allclose(got, lu[i, :n], atol=1e-5, rtol=1e-5)
    # the masked reference gives the same logits
    ref = NativeVLM(_config("masked").model)
    lm = run_fast(lambda b: ref.apply({"params": params}, b, method=NativeVLM.logits), packed[0])
    np.testing.assert_allclose(lm, lp, atol=1e-5, rtol=1e-5)


def test_visual_positions_take_connector_outputs_in_order():
    text = jnp.zeros((1, 6, 2))
    vis = jnp.arange(1, 9, dtype=jnp.float32).reshape(1, 4, 2)
    vm = jnp.array([[0, 1, 1, 0, 1, 0]], bool)
    out = merge_visual(text, vis, vm)
    np.testing.assert_array_equal(out[0, :, 0], [0, 1, 3, 0, 5, 0])


def test_registry_and_batch_spec(setup):
    c, spec, exs, model, params, _ = setup
    m = build_model(c.model)
    assert isinstance(m, NativeVLM)
    bs = batch_spec(c, 3)
    packed = dn.pack(exs, spec, rows=3)[0]
    assert set(bs) == set(packed)
    for k, s in bs.items():
        assert s.shape == packed[k].shape and s.dtype == packed[k].dtype, k
    counts = param_counts(params)
    assert counts["total"] == sum(x.size for x in jax.tree.leaves(params))


def test_train_steps_decrease_loss(setup):
    c, spec, exs, model, _, params = setup  # fresh init (visual experts = text weights)
    tok = load_tokenizer("synthetic")
    exs = list(dn.synthetic_examples(spec, tok.encode, 24, seed=5, sizes=(32, 64)))
    batches = dn.pack(exs, spec, rows=4)
    tx = optax.adamw(3e-3, b1=0.9, b2=0.95, weight_decay=0.05)
    opt = tx.init(params)

    def loss_fn(p, b):
        out = model.apply({"params": p}, b)
        return out["loss_sum"] / out["num_tokens"]

    def step(p, o, b):
        loss, g = jax.value_and_grad(loss_fn)(p, b)
        u, o = tx.update(g, o, p)
        return optax.apply_updates(p, u), o, loss

    step = fast(step, params, opt, batches[0])  # the packed batches all have one shape
    first = None
    for i in range(12):
        params, opt, loss = step(params, opt, batches[i % len(batches)])
        first = float(loss) if first is None else first
    # the loss at the trained params of every batch (the step's loss is taken before its
    # update, which is dropped: no second program to compile)
    evals = [float(step(params, opt, b)[2]) for b in batches]
    assert np.isfinite(evals).all()
    assert np.mean(evals) < first - 0.5, (first, evals)


def test_fused_loss_equals_logits_reference(setup):
    """__call__'s fused cross-entropy (LLM.loss) = next_token_loss on the logits: the whole
    model's loss and count (padded rows, `valid` 0, masked), and the gradient of the loss
    head w.r.t. the hidden states and every LLM param (fp32 rounding)."""
    from vlm_jax.models import layers as L
    c, spec, exs, model, params, _ = setup
    batch = dict(dn.pack(exs, spec, rows=3)[0])
    batch["valid"] = np.array([1, 1, 0], np.int32)   # the last row: eval padding

    def forward(p, b):
        out = model.apply({"params": p}, b)
        ref = model.apply({"params": p}, b, method=NativeVLM.reference_loss)
        return out, ref, model.apply({"params": p}, b, method=NativeVLM.hidden)

    out, (ref_sum, ref_num), h = run_fast(forward, params, batch)
    assert float(ref_sum) > 0
    np.testing.assert_allclose(out["loss_sum"], ref_sum, rtol=1e-5)
    assert float(out["num_tokens"]) == float(ref_num) == float((batch["loss_mask"][:2] > 0).sum())

    mask = NativeVLM._mask(batch)
    heads = {"fused": lambda m, h: m.llm.loss(h, batch["targets"], mask)[0],
             "reference": lambda m, h: L.next_token_loss(m.llm.logits(h), batch["targets"],
                                                         mask)[0]}

    def grads(p, h):
        return {k: jax.grad(lambda p, h, f=f: model.apply({"params": p}, h, method=f),
                            argnums=(0, 1))(p, h) for k, f in heads.items()}

    g = run_fast(grads, params, h)
    (pf, hf), (pr, hr) = g["fused"], g["reference"]
    np.testing.assert_allclose(hf, hr, rtol=1e-4, atol=1e-6 * float(np.abs(hr).max()))
    ref_leaves = dict(jax.tree_util.tree_flatten_with_path(pr["llm"])[0])
    for path, a in jax.tree_util.tree_flatten_with_path(pf["llm"])[0]:
        b = ref_leaves[path]
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * float(np.abs(b).max()) + 1e-7,
                                   err_msg=jax.tree_util.keystr(path))
    assert float(np.abs(pf["llm"]["lm_head"]).max()) > 0
