"""Space-to-channel (+ fused LayerNorm) kernels against XLA, forward and forward+backward.

    python benchmarks/kernels_stc.py            # GPU: Pallas vs XLA; CPU: XLA only (Pallas needs a GPU)

Prints per shape the time of each path, the achieved bandwidth (bytes read + written once) and the
ratio XLA time / Pallas time (> 1: the kernel is faster).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels_common import device_name, time_fn
from nvila_jax.kernels import backend, space_to_channel, space_to_channel_layer_norm

# (name, [B, H, W, C], k): NVILA-8B single image (48x48 S2 map, 3 scales), a batch of 8 such images,
# a 64-frame video (32x32 per frame), NVILA-Lite 12 tiles + thumbnail (3x3, 32 -> 33).
SHAPES = [
    ("8B image 48x48x3456", (1, 48, 48, 3456), 2),
    ("8B 8 images", (8, 48, 48, 3456), 2),
    ("8B video 64 frames", (64, 32, 32, 3456), 2),
    ("Lite 13 tiles 3x3", (13, 32, 32, 1152), 3),
]


def ops(k: int, d: int):
    scale, bias = jnp.ones((d,), jnp.float32), jnp.zeros((d,), jnp.float32)

    def stc(impl):
        return jax.jit(lambda x: space_to_channel(x, k, impl=impl))

    def vjp(f):  # the backward pass alone, from a given cotangent (as inside a model)
        return jax.jit(lambda x, g: jax.vjp(f, x)[1](g)[0])

    def stc_bwd(impl):
        return vjp(lambda x: space_to_channel(x, k, impl=impl))

    def ln(impl):
        return jax.jit(lambda x: space_to_channel_layer_norm(x, k, scale, bias, impl=impl))

    def ln_bwd(impl):
        return vjp(lambda x: space_to_channel_layer_norm(x, k, scale, bias, impl=impl))

    return {"stc fwd": (stc, 2), "stc bwd": (stc_bwd, 2), "stc+ln fwd": (ln, 2), "stc+ln bwd": (ln_bwd, 3)}


def main() -> None:
    on_gpu = backend.platform() == "gpu"
    print(f"device: {device_name()}; dtype bfloat16; times in microseconds")
    print(f"{'shape':24s} {'op':16s} {'xla us':>9s} {'GB/s':>7s} {'pallas us':>10s} {'GB/s':>7s} {'xla/pallas':>10s}")
    for name, shape, k in SHAPES:
        x = jax.random.normal(jax.random.key(0), shape, jnp.bfloat16)
        nbytes = x.size * 2
        g = jax.random.normal(jax.random.key(1), space_to_channel(x, k).shape, jnp.bfloat16)
        for op, (make, passes) in ops(k, k * k * shape[-1]).items():
            args = (x, g) if "bwd" in op else (x,)
            t_xla = time_fn(make("xla"), *args)
            row = f"{name:24s} {op:16s} {t_xla * 1e6:9.1f} {passes * nbytes / t_xla / 1e9:7.0f}"
            if on_gpu:
                t_pl = time_fn(make("pallas"), *args)
                row += f" {t_pl * 1e6:10.1f} {passes * nbytes / t_pl / 1e9:7.0f} {t_xla / t_pl:10.2f}"
            else:
                row += "  (Pallas kernels need a GPU)"
            print(row, flush=True)


if __name__ == "__main__":
    main()
