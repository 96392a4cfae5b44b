"""Pallas kernels for space-to-channel (STC), on the Pallas Triton backend (GPU) or interpreted (CPU tests).

Why Triton and not Mosaic GPU: STC is a gather with zero padding. Mosaic GPU moves data with TMA boxes,
which cannot express the stride-k column selection or a row that does not split into k-wide groups
(W % k != 0); Triton's per-element pointers with masks express both directly. Every kernel works on
flat views (free reshapes), computes each element's source and destination offsets from the reference
index map, and masks the padded positions (loads read 0 there, stores skip them):

    out[b, i, j, (m*k + n)*C + c] = x[b, k*i + m, k*j + n, c]   (0 where k*i+m >= H or k*j+n >= W)

Blocks are powers of two (a Triton requirement): a channel block divides C, so channel blocks never
run past a row, and token blocks are masked at the end. Offsets are int32: arrays up to 2**31 elements
(the dispatcher falls back to XLA beyond that).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

ELEMENTS_PER_PROGRAM = 4096  # elements one program moves (block area), a Triton-friendly register tile
MAX_CHANNEL_BLOCK = 256
MAX_ELEMENTS = 2**31 - 1


class Geometry(NamedTuple):
    b: int
    h: int
    w: int
    c: int
    k: int

    @property
    def hk(self) -> int:
        return -(-self.h // self.k)

    @property
    def wk(self) -> int:
        return -(-self.w // self.k)

    @property
    def tokens(self) -> int:
        return self.b * self.hk * self.wk

    @property
    def out_channels(self) -> int:
        return self.k * self.k * self.c


def _pow2_floor(n: int) -> int:
    return 1 << (max(n, 1).bit_length() - 1)


def _pow2_ceil(n: int) -> int:
    return 1 << (max(n, 1) - 1).bit_length()


def channel_block(c: int) -> int:
    """Largest power of two dividing C (capped), so a channel block never crosses a pixel."""
    return min(c & -c, MAX_CHANNEL_BLOCK)


def _compiler_params(num_warps: int = 4):
    return pltriton.CompilerParams(num_warps=num_warps, num_stages=1)


def _source_offsets(g: Geometry, tok: jax.Array, seg: jax.Array, ch: jax.Array):
    """Flat offsets into x of tokens `tok` (column), segment `seg` = m*k + n, channels `ch` (row), and
    whether each token/segment position lies inside the unpadded map."""
    per_image = g.hk * g.wk
    b, r = tok // per_image, tok % per_image
    h = g.k * (r // g.wk) + seg // g.k
    w = g.k * (r % g.wk) + seg % g.k
    inside = (tok < g.tokens) & (h < g.h) & (w < g.w)
    return ((b * g.h + h) * g.w + w) * g.c + ch, inside


def _load(ref, offsets, mask):
    """Masked gather from a flat ref; masked lanes read 0 (their offsets are pointed at element 0)."""
    mask = jnp.broadcast_to(mask, offsets.shape)
    return pltriton.load(ref.at[jnp.where(mask, offsets, 0)], mask=mask, other=0)


def _store(ref, offsets, value, mask):
    """Masked scatter into a flat ref. Masked lanes are pointed past the end: the GPU never touches them
    and the interpreter drops them, so they cannot race with a real store to the same element."""
    mask = jnp.broadcast_to(mask, offsets.shape)
    pltriton.store(ref.at[jnp.where(mask, offsets, ref.shape[0])], value, mask=mask)


# ----------------------------------------------------------------------------------- plain STC
def _stc_kernel(x_ref, o_ref, *, g: Geometry, bt: int, bc: int):
    tok = pl.program_id(0) * bt + jax.lax.broadcasted_iota(jnp.int32, (bt, 1), 0)
    seg = pl.program_id(1)
    ch = pl.program_id(2) * bc + jax.lax.broadcasted_iota(jnp.int32, (1, bc), 1)
    src, inside = _source_offsets(g, tok, seg, ch)
    vals = _load(x_ref, src, inside)
    _store(o_ref, tok * g.out_channels + seg * g.c + ch, vals, tok < g.tokens)


def _token_block(g: Geometry, bc: int) -> int:
    return max(1, min(ELEMENTS_PER_PROGRAM // bc, _pow2_ceil(g.tokens)))


@functools.partial(jax.jit, static_argnames=("k", "interpret"))
def stc_forward(x: jax.Array, k: int, interpret: bool = False) -> jax.Array:
    """[B, H, W, C] -> [B, ceil(H/k), ceil(W/k), k*k*C]; each program fills one (token block, segment,
    channel block) tile of the output, reading zeros where the block reaches into the padding."""
    g = Geometry(*x.shape, k)
    bc = channel_block(g.c)
    bt = _token_block(g, bc)
    out = pl.pallas_call(
        functools.partial(_stc_kernel, g=g, bt=bt, bc=bc),
        out_shape=jax.ShapeDtypeStruct((g.tokens * g.out_channels,), x.dtype),
        grid=(pl.cdiv(g.tokens, bt), k * k, g.c // bc),
        compiler_params=None if interpret else _compiler_params(),
        interpret=interpret,
        name="space_to_channel",
    )(x.reshape(-1))
    return out.reshape(g.b, g.hk, g.wk, g.out_channels)


# ----------------------------------------------------------------------------------- its transpose
def _stc_transpose_kernel(g_ref, o_ref, *, geo: Geometry, bp: int, bc: int):
    pix = pl.program_id(0) * bp + jax.lax.broadcasted_iota(jnp.int32, (bp, 1), 0)
    ch = pl.program_id(1) * bc + jax.lax.broadcasted_iota(jnp.int32, (1, bc), 1)
    n_pix = geo.b * geo.h * geo.w
    b, r = pix // (geo.h * geo.w), pix % (geo.h * geo.w)
    h, w = r // geo.w, r % geo.w
    tok = (b * geo.hk + h // geo.k) * geo.wk + w // geo.k
    seg = (h % geo.k) * geo.k + w % geo.k
    valid = pix < n_pix
    # Every pixel maps to exactly one (token, segment): a gather from the cotangent, no accumulation.
    vals = _load(g_ref, tok * geo.out_channels + seg * geo.c + ch, valid)
    _store(o_ref, pix * geo.c + ch, vals, valid)


@functools.partial(jax.jit, static_argnames=("shape", "k", "interpret"))
def stc_transpose(g: jax.Array, shape: tuple[int, int, int, int], k: int, interpret: bool = False) -> jax.Array:
    """The VJP of STC: cotangent [B, Hk, Wk, k*k*C] -> [B, H, W, C] (the padded positions are dropped)."""
    geo = Geometry(*shape, k)
    bc = channel_block(geo.c)
    n_pix = geo.b * geo.h * geo.w
    bp = max(1, min(ELEMENTS_PER_PROGRAM // bc, _pow2_ceil(n_pix)))
    out = pl.pallas_call(
        functools.partial(_stc_transpose_kernel, geo=geo, bp=bp, bc=bc),
        out_shape=jax.ShapeDtypeStruct((n_pix * geo.c,), g.dtype),
        grid=(pl.cdiv(n_pix, bp), geo.c // bc),
        compiler_params=None if interpret else _compiler_params(),
        interpret=interpret,
        name="space_to_channel_transpose",
    )(g.reshape(-1))
    return out.reshape(shape)


# ----------------------------------------------------------------------------------- STC + LayerNorm
def _gather_tokens(x_ref, g: Geometry, tok, dp: int):
    """Rows of STC(x) for tokens `tok` [bt, 1], width padded to dp: (float32 values, column mask,
    source offsets, in-map mask)."""
    col = jax.lax.broadcasted_iota(jnp.int32, (1, dp), 1)
    in_row = col < g.out_channels
    src, inside = _source_offsets(g, tok, col // g.c, col % g.c)
    mask = inside & in_row
    x = _load(x_ref, src, mask).astype(jnp.float32)
    return x, in_row, src, mask


def _stc_ln_kernel(x_ref, scale_ref, bias_ref, o_ref, mean_ref, rstd_ref, *, g: Geometry, bt: int, dp: int,
                   eps: float):
    tok = pl.program_id(0) * bt + jax.lax.broadcasted_iota(jnp.int32, (bt, 1), 0)
    x, in_row, _, _ = _gather_tokens(x_ref, g, tok, dp)
    d = g.out_channels
    mean = jnp.sum(x, axis=1, keepdims=True) / d
    xc = jnp.where(in_row, x - mean, 0.0)
    rstd = jax.lax.rsqrt(jnp.sum(xc * xc, axis=1, keepdims=True) / d + eps)
    col = jax.lax.broadcasted_iota(jnp.int32, (1, dp), 1)
    scale = _load(scale_ref, col, in_row).astype(jnp.float32)
    bias = _load(bias_ref, col, in_row).astype(jnp.float32)
    y = xc * rstd * scale + bias
    tok_ok = tok < g.tokens
    _store(o_ref, tok * d + col, y.astype(o_ref.dtype), tok_ok & in_row)
    _store(mean_ref, tok, mean, tok_ok)
    _store(rstd_ref, tok, rstd, tok_ok)


def _ln_blocks(g: Geometry) -> tuple[int, int]:
    dp = _pow2_ceil(g.out_channels)
    return dp, max(1, min(ELEMENTS_PER_PROGRAM // dp, _pow2_ceil(g.tokens)))


@functools.partial(jax.jit, static_argnames=("k", "eps", "interpret"))
def stc_layer_norm_forward(x: jax.Array, k: int, scale: jax.Array, bias: jax.Array, eps: float,
                           interpret: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
    """LayerNorm(STC(x)) in one pass over x: output [B, Hk, Wk, k*k*C] in x.dtype plus the per-token
    float32 mean and 1/std [tokens] that the backward pass reuses. Statistics in float32, two-pass
    variance (centred), as torch.nn.LayerNorm."""
    g = Geometry(*x.shape, k)
    dp, bt = _ln_blocks(g)
    out, mean, rstd = pl.pallas_call(
        functools.partial(_stc_ln_kernel, g=g, bt=bt, dp=dp, eps=eps),
        out_shape=(jax.ShapeDtypeStruct((g.tokens * g.out_channels,), x.dtype),
                   jax.ShapeDtypeStruct((g.tokens,), jnp.float32),
                   jax.ShapeDtypeStruct((g.tokens,), jnp.float32)),
        grid=(pl.cdiv(g.tokens, bt),),
        compiler_params=None if interpret else _compiler_params(num_warps=8),
        interpret=interpret,
        name="space_to_channel_layer_norm",
    )(x.reshape(-1), scale, bias)
    return out.reshape(g.b, g.hk, g.wk, g.out_channels), mean, rstd


def _stc_ln_bwd_kernel(x_ref, scale_ref, mean_ref, rstd_ref, dy_ref, dx_ref, *, g: Geometry, bt: int, dp: int):
    tok = pl.program_id(0) * bt + jax.lax.broadcasted_iota(jnp.int32, (bt, 1), 0)
    x, in_row, src, mask = _gather_tokens(x_ref, g, tok, dp)
    tok_ok = tok < g.tokens
    mean = _load(mean_ref, tok, tok_ok)
    rstd = _load(rstd_ref, tok, tok_ok)
    d = g.out_channels
    col = jax.lax.broadcasted_iota(jnp.int32, (1, dp), 1)
    row_ok = tok_ok & in_row
    dy = _load(dy_ref, tok * d + col, row_ok).astype(jnp.float32)
    scale = _load(scale_ref, col, in_row).astype(jnp.float32)
    xhat = jnp.where(in_row, (x - mean) * rstd, 0.0)
    dxhat = dy * scale
    a = jnp.sum(dxhat, axis=1, keepdims=True) / d
    b = jnp.sum(dxhat * xhat, axis=1, keepdims=True) / d
    dx = rstd * (dxhat - a - xhat * b)
    # Positions in the padding have no x element: their gradient is dropped (masked store).
    _store(dx_ref, src, dx.astype(dx_ref.dtype), mask)


@functools.partial(jax.jit, static_argnames=("k", "interpret"))
def stc_layer_norm_backward_x(x: jax.Array, k: int, scale: jax.Array, mean: jax.Array, rstd: jax.Array,
                              dy: jax.Array, interpret: bool = False) -> jax.Array:
    """dL/dx of LayerNorm(STC(x)) from the output cotangent dy [B, Hk, Wk, k*k*C], scattered straight
    back to the [B, H, W, C] layout (each x element belongs to exactly one token, so no accumulation)."""
    g = Geometry(*x.shape, k)
    dp, bt = _ln_blocks(g)
    dx = pl.pallas_call(
        functools.partial(_stc_ln_bwd_kernel, g=g, bt=bt, dp=dp),
        out_shape=jax.ShapeDtypeStruct((x.size,), x.dtype),
        grid=(pl.cdiv(g.tokens, bt),),
        compiler_params=None if interpret else _compiler_params(num_warps=8),
        interpret=interpret,
        name="space_to_channel_layer_norm_bwd",
    )(x.reshape(-1), scale, mean, rstd, dy.reshape(-1))
    return dx.reshape(x.shape)
