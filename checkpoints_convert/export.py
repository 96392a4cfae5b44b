"""nvila_jax checkpoint -> official NVILA layout: `export(src, dst)`.

For a checkpoint made by `convert`, the manifest lists the source's tensor files (names, dtypes, shapes, order
and metadata) and source/ holds its small files (configs, index files, tokenizer files): export writes the
same files back, each parameter slice transformed to the official layout and cast to the tensor's source
dtype, vocabulary tables cut back to their source rows, the unused tensors taken from extras.safetensors. In
float32 the result equals the source tensor for tensor.

A checkpoint without that record (e.g. parameters saved by training) is written from its config instead:
config files from `NVILAConfig.to_hf_config`, the tokenizer files in llm/, tensors in the parameters' dtype,
the LLM in shards of at most SHARD_BYTES with an index.

Tensors are produced one at a time (one layer's slice of a stacked parameter) and streamed into the files.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from typing import Any

import numpy as np

from checkpoints_convert.key_table import (
    COMPONENTS, from_param, is_used, official_keys, official_shape, resolve, split_hf_layout_key)
from checkpoints_convert.orbax_stream import open_arrays
from checkpoints_convert.safetensors_io import DTYPE_NAMES, DTYPES, StreamingWriter, read_header
from checkpoints_convert.source import INDEX_FILE
from checkpoints_convert.validate import VOCAB_KEYS
from nvila_jax.checkpoint import (
    EXTRAS_FILE, GENERATION_CONFIG_FILE, MANIFEST_FILE, PARAMS_DIR, SOURCE_DIR, TOKENIZER_DIR, atomic_directory, read_config, read_json)

SHARD_BYTES = 5 * 1024**3


def export(src: str, dst: str, force: bool = False, progress: bool = True) -> list[str]:
    """Writes the official checkpoint of the nvila_jax checkpoint `src` to `dst`; returns the files written."""
    from tqdm import tqdm

    cfg = read_config(src)
    manifest = read_json(src, MANIFEST_FILE)
    arrays = open_arrays(os.path.join(os.path.abspath(src), PARAMS_DIR))
    extras_path = os.path.join(src, EXTRAS_FILE)
    extras = read_header(extras_path).tensors if os.path.isfile(extras_path) else {}
    recorded = bool(manifest.get("tensor_files")) and os.path.isdir(os.path.join(src, SOURCE_DIR))
    rows = (manifest.get("vocab") or {}).get("source_rows") if recorded else None  # vocabulary cut back
    files = _recorded_files(manifest) if recorded else _files_from_config(cfg, arrays, extras)
    total = sum(math.prod(shape) * DTYPES[dt].itemsize for f in files for _, dt, shape in f["tensors"])
    written = []
    with atomic_directory(dst, overwrite=force) as tmp, tqdm(total=total, desc="export", unit="B", unit_scale=True,
                                                            unit_divisor=1024, disable=not progress) as bar:
        if recorded:
            _copy_tree(os.path.join(src, SOURCE_DIR), tmp)
        else:
            _write_configs(cfg, src, tmp, files)
        for f in files:
            path = os.path.join(tmp, f["file"])
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with StreamingWriter(path, [tuple(t) for t in f["tensors"]], f["metadata"]) as w:
                for key, dtype, shape in f["tensors"]:
                    x = _official_tensor(cfg, arrays, extras, f["component"], key, rows)
                    if tuple(x.shape) != tuple(shape):
                        raise ValueError(f"{src}: {f['file']} {key}: the parameters give shape {list(x.shape)}, the "
                                         f"manifest records {list(shape)}")
                    w.write(key, x.astype(DTYPES[dtype]))
                    bar.update(x.size * DTYPES[dtype].itemsize)
            written.append(f["file"])
    return written


def _official_tensor(cfg, arrays, extras, component: str, key: str, source_rows: int | None) -> np.ndarray:
    """One official tensor rebuilt from its parameter slice (or taken from the extras)."""
    comp, k = (component, key) if component else split_hf_layout_key(key)
    rule, layer = resolve(cfg, comp, k)
    if not is_used(cfg, rule, layer):
        name = f"{comp}/{k}"
        if name not in extras:
            raise ValueError(f"{name} is not a parameter of the model and {EXTRAS_FILE} does not hold it")
        return extras[name].read()
    array = arrays[rule.path]
    x = np.asarray((array[layer] if layer is not None else array).read().result())
    x = from_param(cfg, rule.transform, x)
    if k in VOCAB_KEYS and source_rows is not None:
        x = x[:source_rows]
    return x


def _recorded_files(manifest: dict) -> list[dict]:
    return [{"file": f["file"], "component": f["component"], "metadata": f.get("metadata") or {},
             "tensors": [(k, dt, tuple(s)) for k, dt, s in f["tensors"]]} for f in manifest["tensor_files"]]


def _files_from_config(cfg, arrays, extras) -> list[dict]:
    """The official files of `cfg`: one model.safetensors per component, the LLM sharded by SHARD_BYTES."""
    files = []
    for component in COMPONENTS:
        entries = []
        for comp, key in official_keys(cfg, include_optional=True):
            if comp != component:
                continue
            rule, layer = resolve(cfg, comp, key)
            if not is_used(cfg, rule, layer):
                ref = extras.get(f"{comp}/{key}")
                if ref is None and rule.optional:
                    continue
                if ref is None:
                    raise ValueError(f"{comp}/{key} is not a parameter of the model and the checkpoint has no "
                                     f"{EXTRAS_FILE} holding it; only converted checkpoints can be exported")
                entries.append((key, ref.dtype, ref.shape))
                continue
            array = arrays[rule.path]
            shape = tuple(array.shape[1:] if layer is not None else array.shape)
            entries.append((key, DTYPE_NAMES[np.dtype(array.dtype.numpy_dtype)], official_shape(rule.transform, shape)))
        entries.sort()
        shards = _shards(entries) if component == "llm" else [entries]
        for i, group in enumerate(shards):
            name = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            files.append({"file": f"{component}/{name}", "component": component, "metadata": {"format": "pt"},
                          "tensors": group})
    return files


def _shards(entries: list) -> list[list]:
    groups, size = [[]], 0
    for e in entries:
        n = math.prod(e[2]) * DTYPES[e[1]].itemsize
        if groups[-1] and size + n > SHARD_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(e)
        size += n
    return groups


def _write_configs(cfg, src: str, out: str, files: list[dict]) -> None:
    """Config files, the LLM index and the tokenizer files of a checkpoint exported from its config."""
    hf = cfg.to_hf_config()
    for name, obj in (("config.json", hf["config.json"]), ("llm/config.json", hf["llm"]),
                      ("vision_tower/config.json", hf["vision_tower"]), ("mm_projector/config.json", hf["mm_projector"])):
        _write_json(os.path.join(out, name), obj)
    llm = [f for f in files if f["component"] == "llm"]
    if len(llm) > 1:
        weight_map = {k: os.path.basename(f["file"]) for f in llm for k, *_ in f["tensors"]}
        total = sum(math.prod(s) * DTYPES[dt].itemsize for f in llm for _, dt, s in f["tensors"])
        _write_json(os.path.join(out, "llm", INDEX_FILE), {"metadata": {"total_size": total},
                                                          "weight_map": dict(sorted(weight_map.items()))})
    _copy_tree(os.path.join(src, TOKENIZER_DIR), os.path.join(out, "llm"))
    generation = read_json(src, GENERATION_CONFIG_FILE)
    if generation:  # suppress_tokens included: transformers' generation honours it too
        _write_json(os.path.join(out, "llm", GENERATION_CONFIG_FILE), generation)


def _copy_tree(src: str, dst: str) -> None:
    for dirpath, _, names in os.walk(src):
        for n in names:
            rel = os.path.relpath(os.path.join(dirpath, n), src)
            os.makedirs(os.path.dirname(os.path.join(dst, rel)), exist_ok=True)
            shutil.copyfile(os.path.join(dirpath, n), os.path.join(dst, rel))


def _write_json(path: str, obj: Any) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")
