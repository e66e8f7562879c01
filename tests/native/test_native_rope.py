"""2D RoPE and the native ViT: relative positions, halves, packing-independence."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.compiled import fast, run_fast
from vlm_jax.models.native_vit import NativeViT, rope_2d, vit_params


def _scores(q, k, pq, pk, theta=100.0):
    """q·k after 2D RoPE of one query at pq=(row, col) and one key at pk."""
    rq = rope_2d(q, jnp.array([[pq[0]]]), jnp.array([[pq[1]]]), theta)
    rk = rope_2d(k, jnp.array([[pk[0]]]), jnp.array([[pk[1]]]), theta)
    return jnp.einsum("bqnh,bknh->n", rq, rk)


def test_scores_depend_only_on_relative_offsets():
    key = jax.random.PRNGKey(0)
    q, k = jax.random.normal(key, (2, 1, 1, 3, 16))
    base = _scores(q, k, (2, 5), (7, 1))
    for shift in [(1, 0), (0, 3), (-2, 4), (10, -1)]:
        moved = _scores(q, k, (2 + shift[0], 5 + shift[1]), (7 + shift[0], 1 + shift[1]))
        np.testing.assert_allclose(moved, base, rtol=1e-5, atol=1e-5)
    # ... and they do depend on the offset, separately in rows and in columns.
    assert not np.allclose(_scores(q, k, (2, 5), (8, 1)), base, atol=1e-3)
    assert not np.allclose(_scores(q, k, (2, 5), (7, 2)), base, atol=1e-3)
    # A row offset is not a column offset (the two axes use separate dimensions).
    assert not np.allclose(_scores(q, k, (0, 0), (1, 0)), _scores(q, k, (0, 0), (0, 1)),
                           atol=1e-3)


def test_rows_rotate_first_half_cols_second_half():
    x = jax.random.normal(jax.random.PRNGKey(1), (1, 1, 2, 8))
    zero = jnp.zeros((1, 1), jnp.int32)
    three = jnp.full((1, 1), 3, jnp.int32)
    np.testing.assert_allclose(rope_2d(x, zero, zero, 10.0), x, atol=1e-6)
    r = rope_2d(x, three, zero, 10.0)
    np.testing.assert_allclose(r[..., 4:], x[..., 4:], atol=1e-6)
    assert not np.allclose(r[..., :4], x[..., :4], atol=1e-3)
    c = rope_2d(x, zero, three, 10.0)
    np.testing.assert_allclose(c[..., :4], x[..., :4], atol=1e-6)
    assert not np.allclose(c[..., 4:], x[..., 4:], atol=1e-3)


def test_rope_2d_rejects_head_dim_not_multiple_of_4():
    with pytest.raises(ValueError, match="divisible by 4"):
        rope_2d(jnp.zeros((1, 1, 1, 6)), jnp.zeros((1, 1)), jnp.zeros((1, 1)), 10.0)


CFG = dict(variant="native", patch_size=4, width=32, depth=2, heads=2, mlp_dim=64,
           norm_eps=1e-6, rope_theta=100.0, scan_layers=True, remat="none")


def test_vit_attends_within_image_and_is_order_free():
    """Outputs of image A do not change when image B shares the row, and permuting the
    patches (positions are explicit) permutes the outputs."""
    vit = NativeViT(CFG)
    rng = np.random.default_rng(0)
    pa, pb = 6, 4
    patches = rng.normal(size=(1, pa + pb, 48)).astype(np.float32)
    rows = np.array([[0, 0, 0, 1, 1, 1, 0, 0, 1, 1]], np.int32)
    cols = np.array([[0, 1, 2, 0, 1, 2, 0, 1, 0, 1]], np.int32)
    seg = np.array([[1] * pa + [2] * pb], np.int32)
    params = run_fast(vit.init, jax.random.PRNGKey(0), patches, rows, cols, seg)
    apply = lambda *a: vit.apply(params, *a)  # noqa: E731
    f = fast(apply, patches, rows, cols, seg)
    both = f(patches, rows, cols, seg)
    alone = run_fast(apply, patches[:, :pa], rows[:, :pa], cols[:, :pa], seg[:, :pa])
    np.testing.assert_allclose(both[:, :pa], alone, atol=1e-5)
    perm = rng.permutation(pa + pb)
    shuffled = f(patches[:, perm], rows[:, perm], cols[:, perm], seg[:, perm])
    np.testing.assert_allclose(shuffled, both[:, perm], atol=1e-5)
    # The positions matter: swapping two patches' contents changes outputs.
    moved = f(patches[:, ::-1], rows, cols, seg)
    assert not np.allclose(moved, both, atol=1e-3)


def test_vit_param_count_matches_init():
    vit = NativeViT(CFG)
    x = np.zeros((1, 4, 48), np.float32)
    z = np.zeros((1, 4), np.int32)
    params = jax.eval_shape(vit.init, jax.random.PRNGKey(0), x, z, z, z + 1)  # shapes only
    n = sum(a.size for a in jax.tree.leaves(params))
    assert n == vit_params(CFG)


def test_vit_rejects_wrong_patch_size():
    vit = NativeViT(CFG)
    x = np.zeros((1, 4, 30), np.float32)
    z = np.zeros((1, 4), np.int32)
    with pytest.raises(ValueError, match="patch_size"):
        vit.init(jax.random.PRNGKey(0), x, z, z, z)


def test_rope_tables_equal_the_reference():
    """The encoder's tables-once rotation is `rope_2d` (within fp32 rounding)."""
    from vlm_jax.models.native_vit import rope_2d_rotate, rope_2d_tables
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 7, 3, 16)), jnp.float32)
    rows = jnp.asarray(rng.integers(0, 40, (2, 7)), jnp.int32)
    cols = jnp.asarray(rng.integers(0, 40, (2, 7)), jnp.int32)
    want = rope_2d(x, rows, cols, 100.0)
    got = rope_2d_rotate(x, *rope_2d_tables(rows, cols, 16, 100.0))
    np.testing.assert_allclose(got, want, atol=2e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="divisible by 4"):
        rope_2d_tables(rows, cols, 6, 100.0)
