"""Official NVILA checkpoint -> nvila_jax checkpoint, streaming: `convert(src, dst, dtype="bfloat16")`.

Everything is validated first (checkpoints_convert.validate); then, in a temporary directory beside the
destination that is renamed only when complete (nvila_jax.checkpoint.atomic_directory):
1. every source file is checksummed (sha256, the same digest as the Hugging Face hub's LFS object ids), in a
   thread beside the conversion;
2. each parameter is read one official tensor at a time (or one block of rows of a large one), transformed
   (transpose / head split / conv layout), cast, and written into its slice of the Orbax array, so memory
   stays near one block (BLOCK_BYTES), not the checkpoint size; vocabulary tables are padded with zero rows
   to the tokenizer's length;
3. the unused tensors go, uncast, to extras.safetensors; the tokenizer, configs, source files and the
   manifest follow.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import shutil
import threading
from typing import Any, Callable, Iterator

import numpy as np

from checkpoints_convert.key_table import row_axis, to_param
from checkpoints_convert.orbax_stream import Block, StreamedArray, save_streamed
from checkpoints_convert.safetensors_io import DTYPES, StreamingWriter
from checkpoints_convert.validate import ConversionPlan, ParamSource, plan_conversion
from nvila_jax import __version__
from nvila_jax.checkpoint import (
    CONFIG_FILE, EXTRAS_FILE, FORMAT, GENERATION_CONFIG_FILE, MANIFEST_FILE, PARAMS_DIR, SOURCE_DIR, TOKENIZER_DIR,
    atomic_directory)

BLOCK_BYTES = 64 * 1024 * 1024  # largest block of one tensor converted at once
TARGET_DTYPES = {"bfloat16": DTYPES["BF16"], "float32": DTYPES["F32"], "float16": DTYPES["F16"]}
Progress = Callable[[int], None]


def convert(src: str, dst: str, dtype: str = "bfloat16", force: bool = False, progress: bool = True) -> dict:
    """Converts the official checkpoint at `src` into an nvila_jax checkpoint at `dst`; returns the manifest.

    Raises CheckpointError (every problem of the source, before anything is written), FileExistsError (`dst`
    exists and not `force`) or ValueError (unknown dtype)."""
    if dtype not in TARGET_DTYPES:
        raise ValueError(f"--dtype {dtype!r} is not supported; expected one of {sorted(TARGET_DTYPES)}")
    dst = os.path.abspath(dst)
    if os.path.lexists(dst) and not force:
        raise FileExistsError(f"{dst} already exists; pass --force to replace it")
    plan = plan_conversion(src)
    if os.path.abspath(plan.source.root) == dst:
        raise ValueError(f"{dst}: the destination is the source checkpoint itself")
    with atomic_directory(dst, overwrite=force) as tmp, _Checksums(plan, progress) as checksums:
        tensor_bytes = sum(r.nbytes for p in plan.params for r in p.refs) + sum(r.nbytes for *_, r in plan.unused)
        with _bar(tensor_bytes, "convert", progress) as bar:
            tree = _param_tree(plan, TARGET_DTYPES[dtype], bar.update)
            save_streamed(os.path.join(tmp, PARAMS_DIR), tree)
            _write_extras(plan, os.path.join(tmp, EXTRAS_FILE), bar.update)
        files = checksums.result()
        plan.tokenizer.save(os.path.join(tmp, TOKENIZER_DIR))
        _write_json(os.path.join(tmp, CONFIG_FILE), json.loads(plan.config.to_json()))
        _write_json(os.path.join(tmp, GENERATION_CONFIG_FILE), _generation_config(plan))
        _copy_small_files(plan, os.path.join(tmp, SOURCE_DIR))
        manifest = _manifest(plan, dtype, files)
        _write_json(os.path.join(tmp, MANIFEST_FILE), manifest)
    return manifest


# ------------------------------------------------------------------------------------------------ params
def _param_tree(plan: ConversionPlan, dtype: np.dtype, progress: Progress) -> dict:
    tree: dict = {}
    for p in plan.params:
        node = tree
        for k in p.path[:-1]:
            node = node.setdefault(k, {})
        node[p.path[-1]] = _streamed(plan, p, dtype, progress)
    return tree


def _streamed(plan: ConversionPlan, p: ParamSource, dtype: np.dtype, progress: Progress) -> StreamedArray:
    """The parameter as blocks: per layer when stacked, and per block of official rows when a tensor is larger
    than BLOCK_BYTES or is a vocabulary table to pad (rows keep whole under transpose / identity)."""
    cfg = plan.source_config
    layer_shape = p.shape[1:] if p.stacked else p.shape
    axis = row_axis(p.rule.transform)
    step = None  # official rows per block; None: each (layer's) tensor at once
    if axis is not None:
        rows_out = layer_shape[axis]
        row_bytes = math.prod(layer_shape) // max(1, rows_out) * max(dtype.itemsize, p.refs[0].np_dtype.itemsize)
        if p.source_rows is not None or rows_out * row_bytes > BLOCK_BYTES:
            step = max(1, BLOCK_BYTES // max(1, row_bytes))
    block_shape = list(layer_shape)
    if step is not None:
        block_shape[axis] = min(step, rows_out)
    if p.stacked:
        block_shape = [1] + block_shape

    def blocks() -> Iterator[Block]:
        for layer, ref in enumerate(p.refs):
            lead = (slice(layer, layer + 1),) if p.stacked else ()
            if step is None:
                x = to_param(cfg, p.rule.transform, ref.read()).astype(dtype)
                progress(ref.nbytes)
                yield lead + (slice(None),) * x.ndim, x[None] if p.stacked else x
                continue
            have = ref.shape[0]
            for start in range(0, rows_out, step):
                stop = min(start + step, rows_out)
                part = ref.read(slice(start, min(stop, have))) if start < have else None
                x = np.zeros((stop - start,) + ref.shape[1:], dtype)
                if part is not None:
                    x[: part.shape[0]] = part
                    progress(part.nbytes)
                x = to_param(cfg, p.rule.transform, x)
                index = [slice(None)] * x.ndim
                index[axis] = slice(start, stop)
                yield lead + tuple(index), x[None] if p.stacked else x

    return StreamedArray(tuple(p.shape), dtype, tuple(block_shape), blocks)


def _write_extras(plan: ConversionPlan, path: str, progress: Progress) -> None:
    """The unused official tensors, in their source dtype, as "<component>/<key>"."""
    entries = [(f"{c}/{k}", r.dtype, r.shape) for c, k, r in plan.unused]
    with StreamingWriter(path, entries, {"format": "nvila_jax.extras"}) as w:
        for (c, k, r), (name, *_) in zip(plan.unused, entries):
            w.write(name, r.read())
            progress(r.nbytes)


# ------------------------------------------------------------------------------------------------ files
class _Checksums(threading.Thread):
    """sha256 of every source file, computed in a thread beside the conversion: it reads (mostly from the page
    cache) while the conversion waits on disk writes. Used as a context manager that stops it on errors."""

    def __init__(self, plan: ConversionPlan, progress: bool):
        super().__init__(name="checksums", daemon=True)
        root = plan.source.root
        rels = sorted({plan.source.relpath(h.path) for _, h in plan.source.headers} | set(plan.source.small_files))
        self._paths = {rel: os.path.join(root, rel) for rel in rels}
        self._progress = progress
        self._cancel = threading.Event()
        self._files: dict[str, dict[str, Any]] = {}
        self._error: BaseException | None = None

    def run(self) -> None:
        try:
            sizes = {rel: os.path.getsize(p) for rel, p in self._paths.items()}
            with _bar(sum(sizes.values()), "checksum", self._progress, position=1) as bar:
                for rel, path in self._paths.items():
                    h = hashlib.sha256()
                    with open(path, "rb") as f:
                        while not self._cancel.is_set() and (chunk := f.read(8 * 1024 * 1024)):
                            h.update(chunk)
                            bar.update(len(chunk))
                    self._files[rel] = {"sha256": h.hexdigest(), "bytes": sizes[rel]}
        except BaseException as e:  # re-raised in the converting thread by result()
            self._error = e

    def result(self) -> dict[str, dict[str, Any]]:
        self.join()
        if self._error is not None:
            raise self._error
        return self._files

    def __enter__(self) -> "_Checksums":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self._cancel.set()
        self.join()


def _copy_small_files(plan: ConversionPlan, directory: str) -> None:
    for rel in plan.source.small_files:
        target = os.path.join(directory, rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copyfile(os.path.join(plan.source.root, rel), target)


def _generation_config(plan: ConversionPlan) -> dict:
    """The source LLM's generation config, plus the ids generation must suppress."""
    src = plan.source
    path = os.path.join(src.tokenizer_dir if src.layout == "hf" else os.path.join(src.root, "llm"),
                        GENERATION_CONFIG_FILE)
    gen = {}
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            gen = json.load(f)
    gen["suppress_tokens"] = list(plan.suppressed_token_ids)
    return gen


def _manifest(plan: ConversionPlan, dtype: str, files: dict) -> dict:
    src = plan.source
    n_params = sum(int(np.prod(p.shape)) for p in plan.params)
    return {
        "format": FORMAT,
        "created_by": f"nvila_jax {__version__} convert",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": {"path": src.root, "layout": src.layout, "tokenizer": plan.tokenizer.source_kind},
        "dtype": dtype,
        "parameter_count": n_params,
        "unused_tensors": len(plan.unused),
        "vocab": {
            "source_rows": plan.source_rows,
            "tokenizer_size": len(plan.tokenizer),
            "rows": plan.config.llm.vocab_size,
            "added_tokens": plan.tokenizer.added,
            "suppressed_token_ids": list(plan.suppressed_token_ids),
        },
        "files": files,
        "tensor_files": [
            {"file": src.relpath(h.path), "component": component, "metadata": h.metadata,
             "tensors": [[k, r.dtype, list(r.shape)] for k, r in h.tensors.items()]}
            for component, h in src.headers
        ],
    }


def _write_json(path: str, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def _bar(total: int, desc: str, enabled: bool, position: int = 0):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=not enabled,
                dynamic_ncols=True, position=position)
