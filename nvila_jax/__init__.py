"""nvila_jax: NVILA (SigLIP + Dynamic-S2 + spatial token compression + MLP projector + Qwen2) in JAX/Flax.

    import nvila_jax
    model = nvila_jax.load_pretrained("converted_dir")
    model.generate("Describe the image.", images=["photo.jpg"])
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "NVILAConfig": "nvila_jax.config",
    "NVILAModel": "nvila_jax.model",
    "get_variant": "nvila_jax.variants",
    "load_pretrained": "nvila_jax.checkpoint",
}


def __getattr__(name: str):
    """Public names are imported on first use so that `import nvila_jax` stays cheap."""
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'nvila_jax' has no attribute {name!r}")


__all__ = list(_EXPORTS)
