"""CpuDotGeneral, inference's dot_general on a CPU: each float32 product reaches the kernel for its number of
rows (rows_matmul up to 16, or 8 for the tied LM head's [N, K] table; blas_matmul beyond) and equals XLA's
dot; dense layers, the LM head, the vision tower and projector, the LLM's SwiGLU MLP (swiglu_matmul beyond 16
rows, same parameters) and its residual updates (o_proj, down_proj: one GEMM with the sum beyond 16 rows);
XLA where no kernel can run."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nvila_jax.kernels import blas_matmul as bm
from nvila_jax.kernels import rows_matmul as rm
from nvila_jax.kernels import swiglu_matmul as sm
from nvila_jax.kernels.cpu_dot_general import CpuDotGeneral

needs_kernels = pytest.mark.skipif(not (rm.available() and bm.available()),
                                   reason="needs a CPU with AVX-512, scipy-openblas32 and a C++ compiler")


def _dense_layers(dot_general_cls):
    """A q_proj-like layer (3-D kernel) feeding an o_proj-like one (two contracted axes)."""

    class Layers(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.DenseGeneral((4, 8), dot_general_cls=dot_general_cls, name="q")(x)
            return nn.DenseGeneral(24, axis=(-2, -1), dot_general_cls=dot_general_cls, name="o")(h)

    return Layers()


def _record_calls(monkeypatch) -> list:
    """(kernel, x shape, transposed) of each kernel call from now on; a product added to an operand in the same
    call (blas_matmul's `add`) is recorded as "blas_matmul+add"."""
    calls = []
    for module, name in ((rm, "rows_matmul"), (bm, "blas_matmul")):
        real = getattr(module, name)

        def record(x, w, transposed=False, add=None, real=real, name=name):
            calls.append((name if add is None else f"{name}+add", x.shape, transposed))
            return real(x, w, transposed) if add is None else real(x, w, transposed, add=add)

        monkeypatch.setattr(module, name, record)
    return calls


@needs_kernels
@pytest.mark.parametrize("rows", [1, 3, 16, 17, 40])
def test_dense_layers_through_the_kernels_equal_xla(rows, monkeypatch):
    calls = _record_calls(monkeypatch)
    x = jnp.asarray(np.random.RandomState(rows).randn(rows, 1, 24).astype(np.float32))
    params = _dense_layers(None).init(jax.random.key(0), x)
    want = _dense_layers(None).apply(params, x)
    got = _dense_layers(CpuDotGeneral).apply(params, x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
    kernel = "rows_matmul" if rows <= 16 else "blas_matmul"  # decode steps stream weights, prefill is a GEMM
    assert calls == [(kernel, (rows, 24), False), (kernel, (rows, 32), False)]


@needs_kernels
@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("rows", [1, 8, 9, 17])
def test_lm_head_through_the_kernels_equals_xla(tied, rows, monkeypatch):
    """Qwen2LM.logits: the tied head ([vocab, D] table, contracted on its last axis) takes the rows kernel up
    to 8 rows, an untied head ([D, vocab] kernel) up to 16; OpenBLAS beyond."""
    from nvila_jax.config import Qwen2Config
    from nvila_jax.models.qwen2 import Qwen2LM

    cfg = Qwen2Config(vocab_size=301, hidden_size=40, intermediate_size=48, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tied)
    hidden = jnp.asarray(np.random.RandomState(rows).randn(rows, 1, 40).astype(np.float32))
    params = Qwen2LM(cfg).init(jax.random.key(0), hidden, method=Qwen2LM.logits)
    want = Qwen2LM(cfg).apply(params, hidden, method=Qwen2LM.logits)
    calls = _record_calls(monkeypatch)
    got = Qwen2LM(cfg, logits_dot_general_cls=CpuDotGeneral).apply(params, hidden, method=Qwen2LM.logits)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
    assert got.shape == (rows, 1, 301)
    kernel = "rows_matmul" if rows <= (8 if tied else 16) else "blas_matmul"
    assert calls == [(kernel, (rows, 40), tied)]


@needs_kernels
def test_vision_tower_and_projector_through_the_kernels_equal_xla(monkeypatch):
    """NVILA's vision_dot_general_cls reaches the linears of the encoder layers (q/k/v/fc1 take the hidden
    size, out the heads, fc2 the MLP width) and of the projector (after its 2x2 STC)."""
    from nvila_jax.models.nvila import NVILA
    from nvila_jax.variants import tiny

    cfg = tiny()
    n_tiles, size = 2, cfg.vision.image_size
    pixels = jnp.asarray(np.random.RandomState(0).uniform(-1, 1, (n_tiles, size, size, 3)).astype(np.float32))
    params = NVILA(cfg).init(jax.random.key(0), pixels, method=NVILA.tile_tokens)
    want = NVILA(cfg).apply(params, pixels, method=NVILA.tile_tokens)
    calls = _record_calls(monkeypatch)
    got = NVILA(cfg, vision_dot_general_cls=CpuDotGeneral).apply(params, pixels, method=NVILA.tile_tokens)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    v, p = cfg.vision, cfg.projector
    rows, stc_rows = n_tiles * v.grid_size**2, n_tiles * v.grid_size**2 // 4  # 2x2 STC in the projector
    encoder = {(rows, v.hidden_size), (rows, v.num_attention_heads * v.head_dim), (rows, v.intermediate_size)}
    projector = {(stc_rows, 4 * p.mm_hidden_size), (stc_rows, p.hidden_size)}
    assert {(name, shape) for name, shape, _ in calls} == {("blas_matmul", s) for s in encoder | projector}


def test_without_the_kernels_everything_goes_to_xla(monkeypatch):
    for module, name in ((rm, "rows_matmul"), (bm, "blas_matmul")):
        monkeypatch.setattr(module, "available", lambda: False)
        monkeypatch.setattr(module, name, lambda *a: pytest.fail("a kernel was called"))
    for rows in (4, 40):
        x = jnp.ones((rows, 1, 24), jnp.float32)
        params = _dense_layers(None).init(jax.random.key(0), x)
        np.testing.assert_array_equal(np.asarray(_dense_layers(CpuDotGeneral).apply(params, x)),
                                      np.asarray(_dense_layers(None).apply(params, x)))
    bf16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)  # other dtypes never reach a kernel either
    assert _dense_layers(CpuDotGeneral).apply(bf16, x.astype(jnp.bfloat16)).dtype == jnp.bfloat16
    cfg = _qwen2_layers()  # the LLM's residual updates (CpuDotGeneral.residual_add) too
    from nvila_jax.models.qwen2 import Qwen2LM

    params = Qwen2LM(cfg, scan_layers=False).init(
        jax.random.key(1), jnp.zeros((1, 30, 40)), jnp.arange(30)[None], jnp.ones((1, 30), jnp.int32), None)
    np.testing.assert_allclose(np.asarray(_qwen2_forward(cfg, CpuDotGeneral, params, 30)),
                               np.asarray(_qwen2_forward(cfg, None, params, 30)), rtol=1e-5, atol=1e-6)


def _qwen2_layers():
    from nvila_jax.config import Qwen2Config

    return Qwen2Config(vocab_size=97, hidden_size=40, intermediate_size=72, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=10)


def _scale_mlp(params, factor: float):
    """params with the MLP's kernels (gate, up, down) multiplied by factor."""
    mlp = ("gate_proj", "up_proj", "down_proj")
    return jax.tree_util.tree_map_with_path(
        lambda path, a: a * factor if any(getattr(k, "key", None) in mlp for k in path) else a, params)


def _qwen2_forward(cfg, dot_general_cls, params, rows):
    from nvila_jax.models.qwen2 import Qwen2LM

    module = Qwen2LM(cfg, scan_layers=False, dot_general_cls=dot_general_cls)
    embeds = jnp.asarray(np.random.RandomState(rows).randn(1, rows, cfg.hidden_size).astype(np.float32))
    positions, segments = jnp.arange(rows)[None], jnp.ones((1, rows), jnp.int32)
    return module.apply(params, embeds, positions, segments, None)[0]


@needs_kernels
@pytest.mark.skipif(not sm.available(), reason="needs a CPU with AVX-512 and a C++ compiler")
@pytest.mark.parametrize("rows", [5, 16, 17, 60])
def test_the_llm_mlp_takes_the_fused_swiglu_kernel_beyond_a_decode_step(rows, monkeypatch):
    """Qwen2's gate/up products and activation: one fused call for more than 16 rows, two weight-streaming
    products up to 16, the same result as XLA either way; the parameters (names, shapes, initial values) do
    not depend on the dot_general_cls."""
    from nvila_jax.models.qwen2 import Qwen2LM

    cfg = _qwen2_layers()
    embeds = jnp.zeros((1, rows, cfg.hidden_size))
    init = [Qwen2LM(cfg, scan_layers=False, dot_general_cls=cls).init(
        jax.random.key(0), embeds, jnp.arange(rows)[None], jnp.ones((1, rows), jnp.int32), None)
        for cls in (None, CpuDotGeneral)]
    # same tree, logical axes included (the boxes' static metadata), and same values
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), *init)
    init = [nn.meta.unbox(p) for p in init]
    assert init[0]["params"]["layers_0"]["gate_proj"]["kernel"].shape == (40, 72)
    # the MLP's weights 10x their initial scale, so that its share of the output is far above the tolerance
    # (attention's are left alone: larger logits would amplify any rounding difference through the softmax)
    params = _scale_mlp(init[0], 10.0)
    want = _qwen2_forward(cfg, None, params, rows)
    fused = []
    real = sm.swiglu_matmul
    monkeypatch.setattr(sm, "swiglu_matmul", lambda x, wg, wu: fused.append(x.shape) or real(x, wg, wu))
    calls = _record_calls(monkeypatch)
    got, want = np.asarray(_qwen2_forward(cfg, CpuDotGeneral, params, rows)), np.asarray(want)
    assert np.abs(want - np.asarray(_qwen2_forward(cfg, None, _scale_mlp(params, 0.0), rows))).max() > 1.0
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * np.abs(want).max())  # float32 rounding
    if rows > 16:
        assert fused == [(rows, 40)] * 2  # per layer
        assert calls.count(("blas_matmul", (rows, 40), False)) == 2 * 3  # q, k, v per layer; no gate, up
        # o and down added to the residual stream by the GEMM itself, once per layer each
        added = [shape for name, shape, _ in calls if name == "blas_matmul+add"]
        assert sorted(added) == [(rows, 40)] * 2 + [(rows, 72)] * 2
    else:
        assert fused == [] and calls.count(("rows_matmul", (rows, 40), False)) == 2 * 6  # q, k, v, o, gate, up
        assert calls.count(("rows_matmul", (rows, 72), False)) == 2 and not any("+add" in c[0] for c in calls)


def test_without_the_swiglu_kernel_the_mlp_takes_two_products(monkeypatch):
    monkeypatch.setattr(sm, "available", lambda: False)
    monkeypatch.setattr(sm, "swiglu_matmul", lambda *a: pytest.fail("the kernel was called"))
    cfg = _qwen2_layers()
    from nvila_jax.models.qwen2 import Qwen2LM

    params = nn.meta.unbox(Qwen2LM(cfg, scan_layers=False).init(
        jax.random.key(1), jnp.zeros((1, 30, 40)), jnp.arange(30)[None], jnp.ones((1, 30), jnp.int32), None))
    np.testing.assert_allclose(np.asarray(_qwen2_forward(cfg, CpuDotGeneral, params, 30)),
                               np.asarray(_qwen2_forward(cfg, None, params, 30)), rtol=1e-5, atol=1e-6)
