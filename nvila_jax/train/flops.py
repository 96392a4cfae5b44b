"""Model FLOPs of a training step (for MFU) and the peak FLOP/s they are compared with.

Counts the matmuls that run (padding included, the full masked attention matrix as computed), forward x 1,
backward x 2 for trainable modules, x 1 for frozen modules that gradients must pass through (activation
gradients only), x 0 for frozen modules before every trainable one. Remat recomputation is not counted
(the usual MFU convention).
"""

from __future__ import annotations

import functools
import time
from typing import Sequence

from nvila_jax.config import NVILAConfig
from nvila_jax.data.packing import VisualGeometry
from nvila_jax.models.projector import projector_layout

ORDER = ("vision_tower", "projector", "llm")  # forward order; gradients flow back through it

# Dense bf16 peak per device, FLOP/s (vendor figures).
PEAK_FLOPS = {"h100": 989e12, "h200": 989e12, "a100": 312e12, "l40s": 362e12, "tpu v4": 275e12,
              "tpu v5 lite": 197e12, "tpu v5e": 197e12, "tpu v5p": 459e12, "tpu v6 lite": 918e12, "tpu v6e": 918e12}


def forward_flops(cfg: NVILAConfig, rows: int, seq_len: int, tiles: int) -> dict[str, float]:
    """Forward matmul FLOPs per module for one micro-batch shape."""
    v, q = cfg.vision, cfg.llm
    geom = VisualGeometry.from_config(cfg)
    g2 = v.grid_size ** 2
    vit_layer = 2 * g2 * (4 * v.hidden_size ** 2 + 2 * v.hidden_size * v.intermediate_size) + 4 * g2 * g2 * v.hidden_size
    vit = tiles * (cfg.num_vision_layers_used * vit_layer + 2 * g2 * v.patch_size ** 2 * 3 * v.hidden_size)
    blocks = geom.s2_blocks(tiles) + tiles
    width, proj = cfg.projector.mm_hidden_size * geom.downsample ** 2, 0
    for spec in projector_layout(cfg.projector):
        if spec.kind == "dense":
            proj += 2 * width * spec.size
            width = spec.size
        elif spec.kind == "ln":
            width = spec.size
    proj *= blocks * geom.tokens_per_block
    tokens = rows * seq_len
    attn_w = q.hidden_size * q.head_dim * (2 * q.num_attention_heads + 2 * q.num_key_value_heads)
    mlp_w = 3 * q.hidden_size * q.intermediate_size
    attn_scores = 4 * rows * seq_len * seq_len * q.num_attention_heads * q.head_dim
    llm = q.num_hidden_layers * (2 * tokens * (attn_w + mlp_w) + attn_scores) + 2 * tokens * q.hidden_size * q.vocab_size
    return {"vision_tower": float(vit), "projector": float(proj), "llm": float(llm)}


def step_flops(cfg: NVILAConfig, rows: int, seq_len: int, tiles: int, micro_batches: int,
               trainable: Sequence[str]) -> float:
    """Model FLOPs of one optimizer step (forward + backward) over `micro_batches` micro-batches."""
    fwd = forward_flops(cfg, rows, seq_len, tiles)
    total = 0.0
    for i, m in enumerate(ORDER):
        if m in trainable:
            factor = 3
        elif any(earlier in trainable for earlier in ORDER[:i]):
            factor = 2
        else:
            factor = 1
        total += factor * fwd[m]
    return total * micro_batches


@functools.lru_cache(maxsize=None)
def measured_matmul_peak(size: int = 1024, repeats: int = 5, dtype: str = "float32") -> float:
    """FLOP/s of the best of `repeats` [size x size] @ [size x size] products in `dtype` on the default device."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones((size, size), dtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * size ** 3 / best


def device_peak_flops(override_tflops: float = 0.0) -> tuple[float, str]:
    """(peak FLOP/s of one device, where the figure comes from)."""
    import jax

    if override_tflops > 0:
        return override_tflops * 1e12, "config"
    dev = jax.devices()[0]
    kind = getattr(dev, "device_kind", "").lower()
    for name, peak in PEAK_FLOPS.items():
        if name in kind:
            return peak, f"{dev.device_kind} bf16 peak"
    return measured_matmul_peak(), f"measured {dev.platform} float32 matmul peak"


def mfu(flops_per_step: float, seconds_per_step: float, peak_per_device: float, devices: int) -> float:
    return flops_per_step / max(seconds_per_step, 1e-12) / (peak_per_device * devices)


