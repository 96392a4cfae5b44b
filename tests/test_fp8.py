"""FP8 recipe against float32: quantization, the FP8 linear and its gradients within derived bounds, the
Flax plumbing (threshold, delayed scaling, path resolution and its log line), the Hopper GEMM kernel
(interpreted / lowered without a GPU) and weight-only quantized linears.

Error bound. An FP8 format with m mantissa bits rounds a normal value with relative error <= u = 2**-(m+1)
(E4M3: 2**-4, E5M2: 2**-3) and a subnormal one with absolute error <= half the subnormal spacing, which in
units of the tensor's scale s is e = s * 2**-10 (E4M3) or s * 2**-17 (E5M2). So |q(a)*s - a| <= u|a| + e
elementwise, and for a product of two quantized operands (exact float32 products, float32 accumulation)

    |sum_k a~_k b~_k - a_k b_k| <= sum_k (u_a|a_k| + e_a)|b_k| + |a_k|(u_b|b_k| + e_b) + (u_a|a_k| + e_a)(u_b|b_k| + e_b)

plus float32 accumulation (covered by 1e-5 of sum |a||b|). The tests check this bound elementwise.
"""

from __future__ import annotations

import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nvila_jax.kernels import fp8
from nvila_jax.kernels.fp8 import gemm, pallas_hopper, weight_only
from nvila_jax.kernels.fp8.quantize import RELATIVE_ROUNDING, fp8_max

HALF_SUBNORMAL = {jnp.dtype(fp8.E4M3): 2.0**-10, jnp.dtype(fp8.E5M2): 2.0**-17}
H0 = np.zeros((0,), np.float32)  # no amax history: dynamic scaling


def _u(dtype) -> float:
    return RELATIVE_ROUNDING[jnp.dtype(dtype)]


def _bound(a, b, fa, fb, sa, sb) -> np.ndarray:
    """Elementwise bound on |a~ @ b~ - a @ b| for a [M, K] quantized to format fa with scale sa, b [K, N]."""
    a, b = np.abs(np.asarray(a, np.float64)), np.abs(np.asarray(b, np.float64))
    da = _u(fa) * a + float(sa) * HALF_SUBNORMAL[jnp.dtype(fa)]
    db = _u(fb) * b + float(sb) * HALF_SUBNORMAL[jnp.dtype(fb)]
    return da @ b + a @ db + da @ db + 1e-5 * (a @ b) + 1e-30


def _data(m, k, n, seed=0):
    kx, kw, kg = jax.random.split(jax.random.key(seed), 3)
    # heavy-ish tails and values spanning several binades exercise normal and subnormal codes
    x = jax.random.normal(kx, (m, k)) * jnp.exp(jax.random.normal(kw, (m, k)))
    w = 0.05 * jax.random.normal(kw, (k, n))
    g = jax.random.normal(kg, (m, n)) * 1e-3
    return x, w, g


@pytest.mark.parametrize("dtype", [fp8.E4M3, fp8.E5M2])
def test_quantize_round_trip_bound_and_saturation(dtype):
    x = jax.random.normal(jax.random.key(0), (4096,)) * jnp.exp(3 * jax.random.normal(jax.random.key(1), (4096,)))
    q, s = fp8.quantize_dynamic(x, dtype)
    assert q.dtype == jnp.dtype(dtype)
    assert float(jnp.max(jnp.abs(q.astype(jnp.float32)))) == fp8_max(dtype)  # amax -> max code
    err = np.abs(np.asarray(fp8.dequantize(q, s)) - np.asarray(x))
    bound = _u(dtype) * np.abs(np.asarray(x)) + float(s) * HALF_SUBNORMAL[jnp.dtype(dtype)]
    assert np.all(err <= bound * (1 + 1e-6))
    assert np.any(err > 0)
    # a scale that is too small (delayed scaling after a spike) saturates instead of overflowing to NaN
    sat = fp8.quantize(x, s / 100, dtype)
    assert np.all(np.isfinite(np.asarray(sat.astype(jnp.float32))))
    assert fp8.scale_from_amax(0.0, dtype) == 1.0


@pytest.mark.parametrize("mkn", [(37, 50, 23), (64, 128, 96), (5, 300, 7)])
def test_fp8_matmul_and_gradients_within_quantization_bound(mkn):
    m, k, n = mkn
    x, w, g = _data(m, k, n, seed=m)
    def fwd_bwd(x, w, g):
        y, vjp = jax.vjp(lambda x, w: fp8.fp8_matmul(x, w, H0, H0, H0, "xla"), x, w)
        return y, *vjp(g)

    y, dx, dw = jax.jit(fwd_bwd)(x, w, g)
    hp = jax.lax.Precision.HIGHEST
    sx = fp8.scale_from_amax(jnp.max(jnp.abs(x)), fp8.E4M3)
    sw = fp8.scale_from_amax(jnp.max(jnp.abs(w)), fp8.E4M3)
    sg = fp8.scale_from_amax(jnp.max(jnp.abs(g)), fp8.E5M2)
    checks = [
        (y, jnp.dot(x, w, precision=hp), _bound(x, w, fp8.E4M3, fp8.E4M3, sx, sw)),
        (dx, jnp.dot(g, w.T, precision=hp), _bound(g, w.T, fp8.E5M2, fp8.E4M3, sg, sw)),
        (dw, jnp.dot(x.T, g, precision=hp), _bound(x.T, g, fp8.E4M3, fp8.E5M2, sx, sg)),
    ]
    for got, want, bound in checks:
        err = np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64))
        assert np.all(err <= bound), float(np.max(err / bound))
        assert np.max(err) > 0  # the operands really went through FP8


def test_fp8_matmul_uses_e5m2_for_gradients():
    """Gradients are quantized with E5M2's range: a cotangent far beyond E4M3's max (448) stays finite and
    within E5M2's bound, and its dx differs from an E4M3-quantized computation."""
    x, w, _ = _data(16, 32, 8)
    g = jax.random.normal(jax.random.key(5), (16, 8)) * 1e4
    _, vjp = jax.vjp(lambda x, w: fp8.fp8_matmul(x, w, H0, H0, H0, "xla"), x, w)
    dx = np.asarray(vjp(g)[0])
    qg, sg = fp8.quantize_dynamic(g, fp8.E5M2)
    qw, sw = fp8.quantize_dynamic(w, fp8.E4M3)
    want = np.asarray(gemm.scaled_matmul_reference(qg, qw, sg, sw))
    np.testing.assert_allclose(dx, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_delayed_scaling_uses_and_updates_histories():
    x, w, g = _data(8, 16, 4)
    hx = jnp.array([0.0, 2 * float(jnp.max(jnp.abs(x))), 0.0], jnp.float32)  # an earlier, larger amax
    hw = jnp.zeros(3, jnp.float32)  # empty history: falls back to the current amax
    hg = jnp.zeros(3, jnp.float32)
    y, vjp = jax.vjp(lambda x, w, hx, hw, hg: fp8.fp8_matmul(x, w, hx, hw, hg, "xla"), x, w, hx, hw, hg)
    sx = fp8.scale_from_amax(hx[1], fp8.E4M3)  # the history's max, not this step's amax
    qw, sw = fp8.quantize_dynamic(w, fp8.E4M3)
    want = gemm.scaled_matmul_reference(fp8.quantize(x, sx, fp8.E4M3), qw.T, sx, sw)
    np.testing.assert_allclose(np.asarray(y), np.asarray(want), rtol=1e-6, atol=1e-6)
    _, _, new_hx, new_hw, new_hg = vjp(g)
    np.testing.assert_allclose(np.asarray(new_hx), [float(jnp.max(jnp.abs(x))), 0.0, hx[1]], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(new_hw), [float(jnp.max(jnp.abs(w))), 0.0, 0.0], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(new_hg), [float(jnp.max(jnp.abs(g))), 0.0, 0.0], rtol=1e-6)


class _Dense(nn.Module):
    features: tuple[int, ...]
    axis: tuple[int, ...]
    dot_general_cls: object

    @nn.compact
    def __call__(self, x):
        return nn.DenseGeneral(self.features, axis=self.axis, dot_general_cls=self.dot_general_cls)(x)


@pytest.mark.parametrize("features,axis,in_shape", [((24,), (-1,), (3, 5, 40)), ((24,), (-2, -1), (3, 4, 10)),
                                                    ((4, 6), (-1,), (2, 40))])
def test_flax_dot_general_threshold_and_layouts(features, axis, in_shape):
    """Linears with min(in, out) >= threshold run in FP8 (within the bound), smaller ones exactly."""
    x = jax.random.normal(jax.random.key(0), in_shape)
    plain = _Dense(features, axis, None)
    params = plain.init(jax.random.key(1), x)
    want = plain.apply(params, x)
    for threshold, quantized in ((24, True), (25, False)):
        cls = fp8.llm_dot_general_cls(fp8.Fp8Config(enabled=True, min_features=threshold))
        got = _Dense(features, axis, cls).apply(params, x)
        assert got.shape == want.shape
        if quantized:
            assert 0 < float(jnp.max(jnp.abs(got - want))) < 0.15 * float(jnp.max(jnp.abs(want)))
        else:
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_dot_general_cls_off_by_default_and_logs_the_path(caplog):
    assert fp8.llm_dot_general_cls(None) is None
    assert fp8.llm_dot_general_cls(fp8.Fp8Config()) is None  # enabled=False
    with caplog.at_level(logging.INFO, logger="nvila_jax.kernels"):
        cls = fp8.llm_dot_general_cls(fp8.Fp8Config(enabled=True))
    assert cls is not None
    assert "XLA FP8 dot_general" in caplog.text and "min(in, out) >= 3584" in caplog.text
    assert fp8.resolve_gemm("auto") == "xla"  # CPU: exact emulation
    assert fp8.resolve_gemm("bf16") == "bf16"
    with pytest.raises(ValueError, match="Hopper"):
        fp8.resolve_gemm("pallas")
    with pytest.raises(ValueError, match="scaling"):
        fp8.Fp8Config(scaling="per-block")


def test_nvila_delayed_scaling_collection_is_per_layer():
    from nvila_jax import get_variant
    from nvila_jax.models.nvila import NVILA

    cfg = get_variant("tiny")
    cls = fp8.llm_dot_general_cls(fp8.Fp8Config(enabled=True, min_features=0, scaling="delayed",
                                                amax_history_length=5))
    s = cfg.vision.image_size
    v = jax.eval_shape(lambda: NVILA(cfg, llm_dot_general_cls=cls).init(
        jax.random.key(0), jnp.zeros((1, s, s, 3)), jnp.zeros((1, 2), jnp.int32), method=NVILA.initialize))
    meta = v[fp8.FP8_META]["llm"]["layers"]
    assert set(meta) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert meta["o_proj"]["Fp8DotGeneral_0"]["output_grad_amax_history"].shape == (cfg.llm.num_hidden_layers, 5)
    assert "vision_tower" not in v[fp8.FP8_META] and "projector" not in v[fp8.FP8_META]


def test_hopper_gemm_lowers_for_cuda_without_a_gpu():
    a = jax.ShapeDtypeStruct((256, 512), jnp.float8_e4m3fn)
    b = jax.ShapeDtypeStruct((384, 512), jnp.float8_e4m3fn)
    s = jax.ShapeDtypeStruct((), jnp.float32)
    text = jax.jit(pallas_hopper.fp8_matmul_nt).trace(a, b, s, s).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text


@pytest.mark.skipif(not hasattr(pallas_hopper.plgpu, "InterpretGPUParams"),
                    reason="Mosaic GPU's CPU interpreter reads transposed refs from jax 0.11 on")
def test_hopper_gemm_interpreted_equals_reference():
    ka, kb = jax.random.split(jax.random.key(0))
    a, sa = fp8.quantize_dynamic(jax.random.normal(ka, (256, 256)), fp8.E4M3)
    b, sb = fp8.quantize_dynamic(jax.random.normal(kb, (128, 256)), fp8.E4M3)
    out = fp8.scaled_matmul(a, b, sa, sb, out_dtype=jnp.float32, impl="pallas", interpret=True)
    ref = fp8.scaled_matmul_reference(a, b, sa, sb)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-4)


def test_gemm_dispatch_errors():
    a = jnp.zeros((128, 128), jnp.float8_e4m3fn)
    with pytest.raises(ValueError, match="Hopper"):
        fp8.scaled_matmul(a, a, 1.0, 1.0, impl="pallas")
    assert gemm.pallas_applies(a, a) and not gemm.pallas_applies(a[:100], a)
    with pytest.raises(ValueError, match="multiples of the tiles"):
        pallas_hopper.fp8_matmul_nt(a[:100], a, jnp.float32(1), jnp.float32(1))


@pytest.mark.parametrize("fmt", weight_only.WEIGHT_FORMATS)
def test_weight_only_quantization_bound(fmt):
    w = jax.random.normal(jax.random.key(0), (3, 64, 4, 8)) * jnp.linspace(0.01, 2, 32).reshape(4, 8)
    q, scale = weight_only.quantize_kernel(w, 1, fmt)
    assert scale.shape == (3, 4, 8)
    err = np.abs(np.asarray(q.astype(jnp.float32) * scale[:, None]) - np.asarray(w))
    if fmt == "int8":
        bound = 0.5 * np.asarray(scale)[:, None] * (1 + 1e-6)  # half a step per output channel
    else:
        bound = _u(fp8.E4M3) * np.abs(np.asarray(w)) + np.asarray(scale)[:, None] * 2.0**-10
    assert np.all(err <= bound + 1e-7)
    assert np.any(err > 0)


@pytest.mark.parametrize("fmt", ["int8", pytest.param("fp8", marks=pytest.mark.slow)])
def test_weight_only_model_logits_close_to_unquantized(fmt):
    from nvila_jax import get_variant
    from nvila_jax.models.nvila import NVILA, init_params

    cfg = get_variant("tiny")
    params = nn.meta.unbox(init_params(cfg, jax.random.key(0)))
    qparams = fp8.quantize_llm_weights(params, fmt)
    assert qparams["llm"]["layers"]["o_proj"]["kernel"].dtype == (jnp.int8 if fmt == "int8" else fp8.E4M3)
    ids = jax.random.randint(jax.random.key(1), (1, 12), 0, cfg.llm.vocab_size)
    pos, seg = jnp.arange(12)[None], jnp.ones((1, 12), jnp.int32)
    vis = jnp.zeros((0, cfg.llm.hidden_size))

    def logits(model, p):
        h, _ = model.apply({"params": p}, ids, -jnp.ones_like(ids), vis, pos, seg)
        return model.apply({"params": p}, h, method=NVILA.logits)

    ref = jax.jit(lambda p: logits(NVILA(cfg), p))(params)
    got = jax.jit(lambda p: logits(NVILA(cfg, llm_dot_general_cls=fp8.weight_only_dot_general_cls()), p))(qparams)
    rel = float(jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref))
    assert 0 < rel < (0.05 if fmt == "int8" else 0.2)
