"""The VLM loss runs the last decoder layer only on the positions that carry loss
(`LLM.decode(keep=...)`): same loss and same gradients as the full sequence through
every layer, scanned (with remat) and unscanned, for packed rows with padding."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from vlm_jax.models import layers as L
from tests.models.test_models_vlm import init, make_batch, tiny_config


def _full_loss(m, params, batch):
    """Reference: logits of every position (no `keep`), then the masked loss."""
    logits = m.apply({"params": params}, batch, method="logits")
    mask = batch["loss_mask"] * batch["valid"][:, None]
    return L.next_token_loss(logits, batch["targets"], mask)[0]


@pytest.mark.parametrize("scan,remat", [(True, "full"), (False, "none")])
def test_keep_path_equals_full_sequence(scan, remat):
    c = tiny_config("vlm", scan=scan, remat=remat)
    batch = make_batch(c, b=3)
    batch["segment_ids"][1, -3:] = 0          # padding tail
    batch["loss_mask"][1, -3:] = 0
    batch["valid"][2] = 0                     # a padding example
    m, params = init(c, batch)

    def ours(p):
        return m.apply({"params": p}, batch)["loss_sum"]
    f = jax.jit(lambda p: (jax.value_and_grad(ours)(p), jax.value_and_grad(
        lambda q: _full_loss(m, q, batch))(p)))
    (a, ga), (b, gb) = f(params)
    assert float(a) > 0
    np.testing.assert_allclose(a, b, rtol=1e-5)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6), ga, gb)
    # the last layer's kept rows: [B, T-K+1, D]
    k = int(batch["visual_mask"][0].sum())
    t = batch["tokens"].shape[1]
    keep = jnp.broadcast_to(jnp.arange(k - 1, t), (3, t - k + 1))
    h, full = jax.jit(lambda p: (m.apply({"params": p}, batch, keep, method="hidden"),
                                 m.apply({"params": p}, batch, method="hidden")))(params)
    assert h.shape == (3, t - k + 1, c.model.llm.width)
    np.testing.assert_allclose(h, full[:, k - 1:], rtol=1e-5, atol=1e-5)


def test_keep_path_keeps_no_copy_of_the_frozen_layers():
    """The first depth-1 layers of the keep path loop over indices into the stacked params:
    scanning their [:-1] slice copied the (frozen) layer weights and autodiff stacked them
    once more as the loop's residuals (XLA:CPU temp for an 8 x 512 frozen LLM with remat
    full: 155 MB before, 37 MB after, the layers being 134 MB)."""
    from vlm_jax.grid import plan
    from vlm_jax.models import batch_spec
    c = common.base_config()
    c.model.vision.update(image_size=32, patch_size=16, width=32, depth=1, heads=2, mlp_dim=64)
    c.model.llm.update(vocab_size=128, width=128, depth=4, heads=4, kv_heads=4, mlp_dim=512,
                       max_len=64, scan_layers=True, remat="full")
    c.data.seq_len = 16
    c.train.batch_size = 2
    model, boxed, _ = plan.abstract_params(c)
    mesh = plan._MeshShape((1, 1, 1))
    leaves = plan._param_leaves(boxed, mesh, c.optim.trainable)     # projector trained
    layer_bytes = sum(v.size * v.dtype.itemsize for p, _, _, _, v in leaves
                      if p.startswith("llm/layers"))
    spec = {k: v for k, v in batch_spec(c, 2).items() if not k.startswith("_")}
    kept, weights = plan.traced_activation_bytes(c, model, boxed, spec, mesh, leaves,
                                                 c.optim.trainable)
    assert kept + weights < 0.1 * layer_bytes, (kept, weights, layer_bytes)   # 3.1 MB before
