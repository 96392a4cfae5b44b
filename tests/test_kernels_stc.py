"""Space-to-channel kernels (interpreted Pallas on CPU) against the pure-JAX reference, forward and VJP,
plus the dispatcher's choices and a GPU lowering check that needs no GPU."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nvila_jax.kernels import space_to_channel, space_to_channel_layer_norm
from nvila_jax.kernels.space_to_channel import (
    pallas_triton,
    space_to_channel_layer_norm_reference,
    space_to_channel_reference,
)

# (B, H, W, C, k): odd grids, H != W, grids smaller than k, C not a power of two (channel blocks of 2, 8),
# token counts that are not a multiple of the token block, NVILA-Lite's 32 -> 33 padding, k = 1.
# The first four run by default; the rest with -m slow (each interpreted shape costs seconds on CPU).
slow = pytest.mark.slow
SHAPES = [
    (2, 5, 7, 6, 2),
    (3, 9, 4, 40, 2),
    (1, 4, 11, 24, 3),
    (2, 2, 2, 10, 3),
    pytest.param((1, 8, 8, 96, 2), marks=slow),
    pytest.param((1, 1, 3, 12, 2), marks=slow),
    pytest.param((2, 32, 32, 8, 3), marks=slow),
    pytest.param((1, 6, 5, 16, 1), marks=slow),
]


def _x(shape, dtype=jnp.float32):
    *dims, _ = shape
    return (jax.random.normal(jax.random.key(sum(shape)), dims) * 2 + 0.5).astype(dtype)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [jnp.float32, pytest.param(jnp.bfloat16, marks=slow)])
def test_stc_pallas_forward_and_vjp_equal_reference(shape, dtype):
    k = shape[-1]
    x = _x(shape, dtype)
    y, vjp = jax.vjp(lambda x: space_to_channel(x, k, impl="pallas", interpret=True), x)
    y_ref, vjp_ref = jax.vjp(lambda x: space_to_channel_reference(x, k), x)
    assert y.shape == y_ref.shape == (x.shape[0], -(-x.shape[1] // k), -(-x.shape[2] // k), k * k * x.shape[3])
    np.testing.assert_array_equal(np.asarray(y), np.asarray(y_ref))  # a permutation with zeros: exact
    g = jax.random.normal(jax.random.key(7), y.shape).astype(dtype)
    np.testing.assert_array_equal(np.asarray(vjp(g)[0]), np.asarray(vjp_ref(g)[0]))


@pytest.mark.parametrize("shape", SHAPES)
def test_stc_layer_norm_pallas_forward_and_grads_match_reference(shape):
    k = shape[-1]
    x = _x(shape)
    d = k * k * x.shape[-1]
    ks = jax.random.split(jax.random.key(3), 3)
    scale, bias = 1 + 0.3 * jax.random.normal(ks[0], (d,)), 0.3 * jax.random.normal(ks[1], (d,))

    def run(impl):
        f = lambda x, s, b: space_to_channel_layer_norm(x, k, s, b, 1e-5, impl=impl, interpret=True)  # noqa: E731
        y, vjp = jax.vjp(f, x, scale, bias)
        return y, vjp(jax.random.normal(ks[2], y.shape))

    (y, grads), (y_ref, grads_ref) = run("pallas"), run("xla")
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, grads_ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)


def test_stc_layer_norm_reference_is_layer_norm_of_stc():
    """The fused op's oracle equals flax's LayerNorm applied after STC (what the projector used to run)."""
    import flax.linen as nn

    x = _x((2, 7, 5, 12, 3))
    s = space_to_channel_reference(x, 3)
    ln = nn.LayerNorm(epsilon=1e-5, use_fast_variance=False)
    params = ln.init(jax.random.key(0), s)
    params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(1), p.shape), params)
    ref = space_to_channel_layer_norm_reference(x, 3, params["params"]["scale"], params["params"]["bias"], 1e-5)
    np.testing.assert_allclose(np.asarray(ref), np.asarray(ln.apply(params, s)), rtol=1e-5, atol=1e-5)


def test_dispatch_choices_and_errors():
    x = _x((1, 4, 4, 8, 2))
    jaxpr = lambda f: str(jax.make_jaxpr(f)(x))  # noqa: E731
    assert "pallas_call" not in jaxpr(lambda x: space_to_channel(x, 2))  # auto on CPU: XLA
    assert "pallas_call" in jaxpr(lambda x: space_to_channel(x, 2, interpret=True))  # auto + interpret: Pallas
    with pytest.raises(ValueError, match="unknown impl"):
        space_to_channel(x, 2, impl="triton")
    with pytest.raises(ValueError, match="interpret=True"):
        space_to_channel(x, 2, impl="pallas")
    with pytest.raises(ValueError, match=r"\[B, H, W, C\]"):
        space_to_channel(x[0], 2)
    with pytest.raises(ValueError, match="k must be >= 1"):
        space_to_channel(x, 0)
    with pytest.raises(ValueError, match=r"scale/bias must have shape \(32,\)"):
        space_to_channel_layer_norm(x, 2, jnp.ones(8), jnp.zeros(8))


def test_projector_runs_the_fused_op_and_keeps_its_parameters():
    """The projector's STC + first LayerNorm go through the fused dispatcher (XLA on CPU), with the same
    parameter tree as before, and the result is STC -> LayerNorm -> Linear -> GELU -> Linear."""
    import flax.linen as nn

    from nvila_jax import get_variant
    from nvila_jax.models.projector import Projector

    cfg = get_variant("tiny").projector
    proj = Projector(cfg)
    maps = jax.random.normal(jax.random.key(0), (1, 5, 7, cfg.mm_hidden_size))
    params = nn.meta.unbox(proj.init(jax.random.key(1), maps))
    assert set(params["params"]) == {"layers_1", "layers_2", "layers_4"}
    assert set(params["params"]["layers_1"]) == {"scale", "bias"}
    p = jax.tree.map(lambda v: v + 0.1 * jax.random.normal(jax.random.key(2), v.shape), params)["params"]
    got = proj.apply({"params": p}, maps)
    assert "pallas_call" not in str(jax.make_jaxpr(lambda m: proj.apply({"params": p}, m))(maps))
    h = space_to_channel_layer_norm_reference(maps, 2, p["layers_1"]["scale"], p["layers_1"]["bias"], 1e-5)
    h = jax.nn.gelu(h @ p["layers_2"]["kernel"] + p["layers_2"]["bias"], approximate=False)
    want = (h @ p["layers_4"]["kernel"] + p["layers_4"]["bias"]).reshape(1, -1, cfg.hidden_size)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_triton_kernels_lower_for_cuda_without_a_gpu():
    """Compile check of the GPU path: the kernels lower to Triton IR for CUDA on a machine without one."""
    x = jax.ShapeDtypeStruct((2, 33, 35, 96), jnp.bfloat16)
    vec = jax.ShapeDtypeStruct((384,), jnp.float32)
    tok = jax.ShapeDtypeStruct((2 * 17 * 18,), jnp.float32)
    cot = jax.ShapeDtypeStruct((2, 17, 18, 384), jnp.bfloat16)
    cases = [
        (lambda x: pallas_triton.stc_forward(x, 2), (x,)),
        (lambda g: pallas_triton.stc_transpose(g, x.shape, 2), (cot,)),
        (lambda x, s, b: pallas_triton.stc_layer_norm_forward(x, 2, s, b, 1e-5), (x, vec, vec)),
        (lambda x, s, m, r, g: pallas_triton.stc_layer_norm_backward_x(x, 2, s, m, r, g), (x, vec, tok, tok, cot)),
    ]
    for f, args in cases:
        try:
            text = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
        except RuntimeError as e:  # jax >= 0.11 asks for an abstract GPU device to lower Triton kernels
            if "No supported GPU devices" in str(e):
                pytest.skip(f"this jax ({jax.__version__}) lowers Triton kernels only with a GPU present")
            raise
        assert "__gpu$xla.gpu.triton" in text or "triton" in text
