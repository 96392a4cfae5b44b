"""FP8 GEMM for Hopper (sm_90) in Pallas Mosaic GPU: wgmma with E4M3 operands, float32 accumulation.

Computes (a @ b_t.T) * a_scale * b_scale for a [M, K] and b_t [N, K], both E4M3 and both K-major: Hopper's
8-bit wgmma reads both operands with K contiguous (B is given transposed, as cuBLASLt's "TN" FP8 layout).
Each CTA owns one (tile_m, tile_n) output tile: a TMA pipeline streams (tile_m, tile_k) and
(tile_n, tile_k) blocks of a and b_t into swizzled shared memory `steps` deep, one warpgroup issues the
wgmmas into a register accumulator, and the epilogue applies the two per-tensor scales, casts and stores
through shared memory with TMA.

M, N, K must be multiples of the tile sizes (the dispatcher falls back to XLA otherwise). wgmma takes one
element type for A and B, so E5M2 x E4M3 products (the backward pass) go through XLA.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu


@dataclasses.dataclass(frozen=True)
class TileConfig:
    tile_m: int = 128
    tile_n: int = 128
    tile_k: int = 128
    steps: int = 4  # pipeline depth (shared-memory stages)

    def fits(self, m: int, n: int, k: int) -> bool:
        return m % self.tile_m == 0 and n % self.tile_n == 0 and k % self.tile_k == 0


DEFAULT_TILES = TileConfig()


def interpret_params():
    """Mosaic GPU's CPU interpreter (jax >= 0.11; 0.10's interpreter cannot read transposed refs)."""
    params = getattr(plgpu, "InterpretGPUParams", None)
    if params is None:
        raise NotImplementedError(
            f"the Mosaic GPU FP8 GEMM runs interpreted only on jax >= 0.11 (installed: {jax.__version__})")
    return params()


def _smem_transforms(cols: int, itemsize: int):
    swizzle = plgpu.find_swizzle(cols * itemsize * 8)
    return plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle)


@functools.partial(jax.jit, static_argnames=("out_dtype", "tiles", "interpret"))
def fp8_matmul_nt(
    a: jax.Array,
    b_t: jax.Array,
    a_scale: jax.Array,
    b_scale: jax.Array,
    out_dtype=jnp.bfloat16,
    tiles: TileConfig = DEFAULT_TILES,
    interpret: bool = False,
) -> jax.Array:
    """(a [M, K] @ b_t [N, K].T) * a_scale * b_scale -> [M, N] out_dtype; a, b_t float8_e4m3fn."""
    (m, k), (n, k2) = a.shape, b_t.shape
    if k != k2 or a.dtype != jnp.float8_e4m3fn or b_t.dtype != jnp.float8_e4m3fn:
        raise ValueError(f"fp8_matmul_nt expects E4M3 a [M, K] and b_t [N, K]; got {a.dtype}{a.shape}, "
                         f"{b_t.dtype}{b_t.shape}")
    if not tiles.fits(m, n, k):
        raise ValueError(f"fp8_matmul_nt: M, N, K = {m}, {n}, {k} must be multiples of the tiles {tiles}")
    tm, tn, tk = tiles.tile_m, tiles.tile_n, tiles.tile_k
    in_tr = _smem_transforms(tk, 1)
    out_tr = _smem_transforms(tn, jnp.dtype(out_dtype).itemsize)
    scale = (a_scale.astype(jnp.float32) * b_scale.astype(jnp.float32)).reshape(1)

    def body(a_gmem, b_gmem, scale_gmem, out_gmem, out_smem):
        i, j = lax.axis_index("m"), lax.axis_index("n")

        def accumulate(acc_ref):
            def step(_, a_smem, b_smem):
                plgpu.wgmma(acc_ref, a_smem, b_smem.transpose((1, 0)))
                plgpu.wgmma_wait(1)  # keep one wgmma in flight while the next blocks land

            plgpu.emit_pipeline(
                step,
                grid=(k // tk,),
                # delay_release=1: a stage is refilled only after the wgmma still reading it has retired.
                in_specs=[plgpu.BlockSpec((tm, tk), lambda kk: (i, kk), transforms=in_tr, delay_release=1),
                          plgpu.BlockSpec((tn, tk), lambda kk: (j, kk), transforms=in_tr, delay_release=1)],
                max_concurrent_steps=tiles.steps,
            )(a_gmem, b_gmem)
            plgpu.wgmma_wait(0)
            return acc_ref[...]

        acc = pl.run_scoped(accumulate, plgpu.ACC((tm, tn), jnp.float32))
        out_smem[...] = (acc * scale_gmem[0]).astype(out_dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(out_smem, out_gmem.at[pl.ds(i * tm, tm), pl.ds(j * tn, tn)])
        plgpu.wait_smem_to_gmem(0)

    kernel = plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((m, n), out_dtype),
        scratch_types=[plgpu.SMEM((tm, tn), out_dtype, transforms=out_tr)],
        grid=(m // tm, n // tn),
        grid_names=("m", "n"),
        compiler_params=plgpu.CompilerParams(),
        interpret=interpret_params() if interpret else None,
    )
    return kernel(a, b_t, scale)
