"""Training run configs: ml_collections files in configs/ with `get_config()`, overridable from the command
line as `--config.key=value` (nested keys with dots). `base_config()` holds every key with its default."""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import os
from typing import Any, Sequence

import ml_collections
from ml_collections import config_dict

from nvila_jax.config import ConfigError, NVILAConfig
from nvila_jax.kernels.fp8.linear import Fp8Config
from nvila_jax.variants import get_variant


class RunConfigError(ValueError):
    """A config file or override that cannot be used (names the key and what was expected)."""


def base_config() -> ml_collections.ConfigDict:
    """Every training key with its default. Stage configs start from this and change what they need."""
    c = ml_collections.ConfigDict()
    c.model = "tiny"  # a variant name (nvila_jax.variants.VARIANTS)
    c.model_overrides = ml_collections.ConfigDict()  # NVILAConfig fields to replace, nested for sub-configs
    c.tokenizer = "tiny"  # "tiny" (built in), a tokenizer directory, or "" for init_from's tokenizer
    c.init_from = ""  # "": random init; a training workdir (its latest params) or an nvila_jax model directory
    c.trainable = ("vision_tower", "projector", "llm")
    c.seed = 0

    c.num_train_steps = 1000
    c.learning_rate = 1e-4
    c.module_learning_rates = ml_collections.ConfigDict(
        {"vision_tower": config_dict.placeholder(float), "projector": config_dict.placeholder(float),
         "llm": config_dict.placeholder(float)})  # unset: learning_rate (reference --vision_tower_lr etc.)
    c.lr_schedule = "cosine"  # or "constant"
    c.warmup_ratio = 0.03
    c.weight_decay = 0.0
    c.adam_b1, c.adam_b2, c.adam_eps = 0.9, 0.999, 1e-8
    c.max_grad_norm = 0.0  # 0: no clipping
    c.mesh = ""  # "": one device; else a mesh over every device, e.g. "fsdp=-1" or "data=2,fsdp=-1,tensor=2"
    c.compute_dtype = "bfloat16"  # parameters stay float32 (master weights)
    c.remat = "none"  # none | full | dots | dots_all (models/layers.py REMAT_POLICIES)
    c.loss_chunk = 0  # positions per cross-entropy chunk; 0: the whole row at once
    # FP8 for the LLM's linears with min(in, out) >= min_features (NVILA: 3584), E4M3 x/w, E5M2 gradients;
    # scaling "dynamic" (the reference) or "delayed" (amax histories, carried in the train state);
    # gemm "auto" | "pallas" | "xla" | "bf16" (nvila_jax/kernels/fp8, docs/kernels.md).
    c.fp8 = ml_collections.ConfigDict({"enabled": False, "min_features": 3584, "scaling": "dynamic",
                                       "amax_history_length": 16, "gemm": "auto"})

    c.data = ml_collections.ConfigDict()
    c.data.mixture = "synthetic"  # a mixture YAML (nvila_jax/data/mixture.py) or "synthetic" (shapes data)
    c.data.synthetic_records = 2000
    c.data.synthetic_seed = 0
    c.data.rows_per_batch = 8  # rows per micro-batch on each process
    c.data.seq_len = 512
    c.data.tile_buckets = (128,)  # ViT tiles per micro-batch; the largest is the budget
    c.data.accumulation = 1  # micro-batches per optimizer step
    c.data.group_steps = 2  # steps packed together (first fit across their micro-batches)
    c.data.image_policy = "all_images"  # dynamic tiling for every image (reference training) | "single_image"
    c.data.num_video_frames = 0  # 0: the model's num_video_frames
    c.data.num_workers = 0  # grain worker processes (0: decode in this process)
    c.data.read_threads = 1
    c.data.prefetch = 2  # steps kept on device ahead of the train step

    c.save_every = 500
    c.keep_checkpoints = 3
    c.async_checkpointing = True
    c.log_every = 10
    c.peak_tflops_per_device = 0.0  # 0: known accelerator peak, or a measured matmul peak on CPU
    return c


def load_config(path: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """`path` (optionally `path.py:arg`, passed to get_config) + `--config.key=value` overrides."""
    arg = None
    if ":" in os.path.basename(path):
        path, arg = path.rsplit(":", 1)
    if not os.path.isfile(path):
        raise RunConfigError(f"{path}: config file not found")
    spec = importlib.util.spec_from_file_location(f"nvila_run_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise RunConfigError(f"{path}: defines no get_config()")
    cfg = module.get_config(arg) if arg is not None else module.get_config()
    apply_overrides(cfg, overrides)
    return cfg


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: Sequence[str]) -> None:
    """Applies `--config.a.b=value` strings; the value is parsed to the type of the existing key."""
    for item in overrides:
        if not item.startswith("--config.") or "=" not in item:
            raise RunConfigError(f"unexpected argument {item!r}; overrides look like --config.key=value")
        key, raw = item[len("--config."):].split("=", 1)
        *parents, leaf = key.split(".")
        node = cfg
        for p in parents:
            if p not in node or not isinstance(node[p], ml_collections.ConfigDict):
                raise RunConfigError(f"--config.{key}: no config section {p!r}")
            node = node[p]
        if leaf not in node:
            raise RunConfigError(f"--config.{key}: unknown key; known keys here: {sorted(node.keys())}")
        node[leaf] = _parse(key, raw, node[leaf])


def _parse(key: str, raw: str, current: Any) -> Any:
    if isinstance(current, bool):
        if raw.lower() in ("true", "1", "yes"):
            return True
        if raw.lower() in ("false", "0", "no"):
            return False
        raise RunConfigError(f"--config.{key}={raw}: expected true or false")
    if isinstance(current, str):
        return raw
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        raise RunConfigError(f"--config.{key}={raw}: not a Python literal") from None
    if isinstance(current, ml_collections.ConfigDict):
        if not isinstance(value, dict):
            raise RunConfigError(f"--config.{key}={raw}: expected a dict")
        value = ml_collections.ConfigDict(_merged(current.to_dict(), value))  # merged into the existing dict
    elif isinstance(current, (tuple, list)):
        value = tuple(value) if isinstance(value, (tuple, list)) else (value,)
    elif isinstance(current, float) and isinstance(value, int):
        value = float(value)
    elif current is not None and not isinstance(value, type(current)):
        raise RunConfigError(f"--config.{key}={raw}: expected {type(current).__name__}")
    return value


def _merged(base: dict, changes: dict) -> dict:
    out = dict(base)
    for k, v in changes.items():
        out[k] = _merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def model_config(cfg: ml_collections.ConfigDict) -> NVILAConfig:
    """The run's NVILAConfig: the named variant with `model_overrides` applied (nested for sub-configs)."""
    try:
        base = get_variant(cfg.model)
    except KeyError as e:
        raise RunConfigError(f"config.model: {e.args[0]}") from None
    try:
        return _replace(base, cfg.model_overrides.to_dict(), "model_overrides")
    except ConfigError as e:
        raise RunConfigError(f"config.model_overrides: {e}") from None


def fp8_config(cfg: ml_collections.ConfigDict) -> Fp8Config:
    """The run's FP8 option (`config.fp8`)."""
    known = {f.name for f in dataclasses.fields(Fp8Config)}
    unknown = sorted(set(cfg.fp8.keys()) - known)
    if unknown:
        raise RunConfigError(f"config.fp8: unknown keys {unknown}; expected {sorted(known)}")
    try:
        return Fp8Config(**cfg.fp8.to_dict())
    except ValueError as e:
        raise RunConfigError(f"config.fp8: {e}") from None


def _replace(obj: Any, changes: dict, where: str) -> Any:
    fields = {f.name for f in dataclasses.fields(obj)}
    kw = {}
    for k, v in changes.items():
        if k not in fields:
            raise RunConfigError(f"config.{where}.{k}: {type(obj).__name__} has no field {k!r}")
        cur = getattr(obj, k)
        if dataclasses.is_dataclass(cur) and isinstance(v, dict):
            kw[k] = _replace(cur, v, f"{where}.{k}")
        else:
            kw[k] = tuple(v) if isinstance(cur, tuple) and isinstance(v, (list, tuple)) else v
    return dataclasses.replace(obj, **kw)


def tiny_config() -> ml_collections.ConfigDict:
    """The tiny NVILA on the synthetic shapes dataset (configs/tiny.py and `nvila-jax demo`).

    The `tiny` variant (56 px tiles, 7 px patches, 2x2 token compression, GQA Qwen2) with Dynamic-S2 over two
    scales (56 px + an aspect-preserving 4..6-tile grid, so 64..96 visual tokens per image) and a wider LLM:
    enough to learn colours, shapes, counts and positions in a few CPU minutes.
    """
    c = base_config()
    c.model = "tiny"
    c.model_overrides = ml_collections.ConfigDict({
        "s2_scales": (56, 112), "max_tiles": 6,
        "vision": {"hidden_size": 64, "intermediate_size": 128},
        "projector": {"mm_hidden_size": 128, "hidden_size": 128},
        "llm": {"hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 4, "head_dim": 32}})
    c.tokenizer = "tiny"
    c.num_train_steps = 600
    c.learning_rate = 3e-3
    c.warmup_ratio = 0.05
    c.max_grad_norm = 1.0
    c.compute_dtype = "float32"  # bfloat16 matmuls are emulated (slow) on CPU
    c.data.mixture = "synthetic"
    c.data.synthetic_records = 4000
    c.data.rows_per_batch = 12  # samples (an image and its 2-4 questions) are 170-242 tokens: one per row
    c.data.seq_len = 256
    c.data.tile_buckets = (128,)
    c.save_every = 100
    c.keep_checkpoints = 2
    c.log_every = 10
    return c


def stage_config(*, model: str, init_from: str, trainable: Sequence[str], learning_rate: float,
                 max_grad_norm: float, seq_len: int, accumulation: int, tile_buckets: Sequence[int],
                 mixture: str, num_train_steps: int) -> ml_collections.ConfigDict:
    """A stage of the reference recipe (NVILA_REFERENCE.md §7): bf16 compute with float32 master weights,
    AdamW with the HF defaults and no weight decay, 3% warmup + cosine, full remat (the reference's gradient
    checkpointing), one packed row of `seq_len` tokens per device micro-batch."""
    c = base_config()
    c.model = model
    c.tokenizer = ""  # the tokenizer of init_from
    c.init_from = init_from
    c.trainable = tuple(trainable)
    c.learning_rate = learning_rate
    c.max_grad_norm = max_grad_norm
    c.warmup_ratio = 0.03
    c.weight_decay = 0.0
    c.compute_dtype = "bfloat16"
    c.remat = "full"
    c.loss_chunk = 1024
    c.num_train_steps = num_train_steps
    c.data.mixture = mixture
    c.data.rows_per_batch = 1
    c.data.seq_len = seq_len
    c.data.accumulation = accumulation
    c.data.tile_buckets = tuple(tile_buckets)
    c.data.num_workers = 8
    c.data.read_threads = 4
    c.save_every = 500
    c.keep_checkpoints = 3
    return c
