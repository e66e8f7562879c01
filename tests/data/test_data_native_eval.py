"""Native eval split: packed like training (fewer forward rows), same loss as one example
per row with the real native model; per-process rows of the same global batches."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from configs import native as cn
from vlm_jax.data import native, pipeline


def _config():
    c = cn.get_config("demo_run,llm=t64,vit=e16,batch_size=4")
    c.data.eval_n = 10
    return c


def _mean_loss(step, params, batches):
    outs = [jax.device_get(step(params, {}, {k: jnp.asarray(v) for k, v in b.items()
                                             if not k.startswith("_")})) for b in batches]
    return (sum(float(o["loss_sum"]) for o in outs) / sum(float(o["num_tokens"]) for o in outs),
            sum(float(o["num_tokens"]) for o in outs))


def test_packed_eval_equals_one_example_per_row():
    from vlm_jax.models import batch_spec, build_model
    from vlm_jax.train import step as step_lib
    from vlm_jax.train.trainer import FAST_COMPILE
    c = _config()
    packed = pipeline.eval_batches(c)
    config, spec, split, load = native._setup(c)
    examples = [load.map((p, split.eval_record(p))) for p in range(split.eval_n)]
    flat = native.pack(examples, dataclasses.replace(spec, packing=False), 4)
    assert len(flat) == 3 and len(packed) < len(flat)
    assert max(int(b["segment_ids"].max()) for b in packed) >= 2   # rows hold several
    for k in ("loss_mask", "visual_mask"):
        assert sum(b[k].sum() for b in packed) == sum(b[k].sum() for b in flat), k
    model = build_model(c.model)
    init_batch = {k: jnp.zeros(s.shape, s.dtype) for k, s in batch_spec(c, 4).items()
                  if not k.startswith("_")}
    params = model.init(jax.random.PRNGKey(0), init_batch, deterministic=True)["params"]
    params = jax.tree.map(lambda x: getattr(x, "value", x), params,
                          is_leaf=lambda x: hasattr(x, "value"))
    # one program serves both (same batch shapes); XLA's fast level: a third of the compile
    step = jax.jit(step_lib.make_eval_step(model)).lower(params, {}, init_batch).compile(
        FAST_COMPILE)
    (l_packed, n_packed), (l_flat, n_flat) = (_mean_loss(step, params, packed),
                                              _mean_loss(step, params, flat))
    assert n_packed == n_flat > 0
    np.testing.assert_allclose(l_packed, l_flat, rtol=2e-5)


def test_eval_rows_split_across_processes():
    c = _config()
    whole = pipeline.eval_batches(c)
    parts = [pipeline.eval_batches(c, p, 2) for p in range(2)]
    assert len(parts[0]) == len(parts[1]) == len(whole)
    for w, a, b in zip(whole, *parts):
        assert a["tokens"].shape[0] == b["tokens"].shape[0] == 2
        np.testing.assert_array_equal(np.concatenate([a["tokens"], b["tokens"]]), w["tokens"])
        np.testing.assert_array_equal(np.concatenate([a["valid"], b["valid"]]), w["valid"])
