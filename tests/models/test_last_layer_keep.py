"""The VLM loss runs the last decoder layer only on the positions that carry loss
(`LLM.decode(keep=...)`): same loss and same gradients as the full sequence through
every layer, scanned (with remat) and unscanned, for packed rows with padding."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax import models
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
