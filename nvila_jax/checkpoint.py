"""nvila_jax checkpoint directories: the layout, restoring parameters, and `load_pretrained`.

A checkpoint directory (written by `nvila-jax convert`, see docs/convert.md) holds:

    config.json              the NVILAConfig (NVILAConfig.to_json), vocabulary padded to the tokenizer's length
    generation_config.json   the source's generation config plus `suppress_tokens`: ids never trained
    params/                  Orbax PyTree checkpoint of {"vision_tower", "projector", "llm"}
    tokenizer/               tokenizer.json + tokenizer_config.json (chat template, special tokens)
    extras.safetensors       official tensors the model never uses ("<component>/<key>", source dtype),
                             kept so that `nvila-jax export` gives the official checkpoint back exactly
    source/                  the official checkpoint's small files verbatim (configs, index, tokenizer files)
    manifest.json            format, source path and layout, dtype, parameter count, checksum of each source
                             file, the source's tensor files (names, dtypes, shapes, order) for export

A directory appears only when complete (`atomic_directory`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import Any, Iterator, Mapping, Sequence

FORMAT = "nvila_jax.checkpoint/1"
CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
PARAMS_DIR = "params"
TOKENIZER_DIR = "tokenizer"
EXTRAS_FILE = "extras.safetensors"
SOURCE_DIR = "source"
MANIFEST_FILE = "manifest.json"
_PARTIAL = ".partial-"


class CheckpointFormatError(ValueError):
    """A directory that is not a (complete) nvila_jax checkpoint."""


# ---------------------------------------------------------------------------------------------- reading
def read_config(directory: str | os.PathLike) -> Any:
    """The NVILAConfig of a checkpoint directory."""
    from nvila_jax.config import NVILAConfig

    path = os.path.join(os.fspath(directory), CONFIG_FILE)
    _require(directory, (CONFIG_FILE, PARAMS_DIR, TOKENIZER_DIR))
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        return NVILAConfig.from_json(text)
    except (ValueError, TypeError, KeyError) as e:
        raise CheckpointFormatError(f"{path}: not an nvila_jax config ({e}); an official checkpoint directory "
                                    "must be converted first: nvila-jax convert SRC DST") from None


def read_json(directory: str | os.PathLike, name: str) -> dict:
    """A JSON file of a checkpoint directory, {} when absent."""
    path = os.path.join(os.fspath(directory), name)
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def suppressed_token_ids(directory: str | os.PathLike) -> tuple[int, ...]:
    """Ids generation must never produce (`suppress_tokens` of generation_config.json)."""
    return tuple(read_json(directory, GENERATION_CONFIG_FILE).get("suppress_tokens") or ())


def restore_params(directory: str | os.PathLike, target: Any = None, dtype: Any = None) -> Any:
    """The parameter tree of a checkpoint directory as jax arrays.

    `target`: an abstract tree of `jax.ShapeDtypeStruct` carrying shardings (e.g. from nvila_jax.sharding) to
    restore each array directly into its shards, on any mesh; by default every array goes to the first
    device. `dtype` casts every parameter while reading (default: as stored; ignored when `target` is given,
    whose dtypes rule).
    """
    import jax
    import orbax.checkpoint as ocp

    path = os.path.join(os.path.abspath(os.fspath(directory)), PARAMS_DIR)
    _require(directory, (PARAMS_DIR,))
    if target is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        stored = ocp.PyTreeCheckpointer().metadata(path).item_metadata.tree
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, dtype or m.dtype, sharding=device), stored,
                              is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"))
    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore(path, target)


def stored_dtype(directory: str | os.PathLike) -> Any:
    """The dtype the parameters are stored in (that of the LLM's embedding table)."""
    import orbax.checkpoint as ocp

    path = os.path.join(os.path.abspath(os.fspath(directory)), PARAMS_DIR)
    return ocp.PyTreeCheckpointer().metadata(path).item_metadata.tree["llm"]["embed_tokens"]["embedding"].dtype


def load_pretrained(directory: str | os.PathLike, mesh_shape: Mapping[str, int] | Sequence[int] | str | None = None,
                    dtype: Any = None) -> Any:
    """The NVILAModel of a converted checkpoint directory (see `nvila-jax convert`).

    `dtype`: parameter and compute dtype (default: the stored one, bfloat16 unless converted with
    --dtype float32). `mesh_shape` (e.g. {"data": 2, "fsdp": 2, "tensor": 2}) restores the parameters directly
    into their shards on a device mesh built by `nvila_jax.sharding`.
    """
    import jax.numpy as jnp

    from nvila_jax.model import NVILAModel
    from nvila_jax.text.tokenizer import NVILATokenizer

    directory = os.fspath(directory)
    config = read_config(directory)
    dtype = jnp.dtype(dtype) if dtype is not None else jnp.dtype(stored_dtype(directory))
    target = mesh = None
    if mesh_shape is not None:
        try:
            from nvila_jax import sharding
        except ImportError:
            raise ValueError("load_pretrained(mesh_shape=...) restores onto a device mesh with nvila_jax.sharding, "
                             "which this installation does not have; pass mesh_shape=None (one device)") from None
        mesh = sharding.make_mesh(mesh_shape)
        target = sharding.abstract_sharded_params(config, mesh, dtype)
    params = restore_params(directory, target, dtype)
    tokenizer = NVILATokenizer.from_dir(os.path.join(directory, TOKENIZER_DIR))
    return NVILAModel(config, params, tokenizer, dtype=dtype, suppressed_token_ids=suppressed_token_ids(directory),
                      mesh=mesh)


def _require(directory: str | os.PathLike, names: Sequence[str]) -> None:
    directory = os.fspath(directory)
    missing = [n for n in names if not os.path.exists(os.path.join(directory, n))]
    if missing:
        hint = (" (it looks like an official checkpoint: convert it first with `nvila-jax convert SRC DST`)"
                if os.path.isdir(os.path.join(directory, "llm")) else "")
        raise CheckpointFormatError(f"{directory}: not an nvila_jax checkpoint, missing {', '.join(missing)}{hint}")


# ---------------------------------------------------------------------------------------------- writing
@contextlib.contextmanager
def atomic_directory(destination: str | os.PathLike, overwrite: bool = False) -> Iterator[str]:
    """Yields a temporary directory beside `destination` that becomes `destination` only when the block
    completes; on any error (or KeyboardInterrupt / SystemExit) it is removed. An existing destination is
    replaced only with `overwrite`. Leftovers of a killed earlier run (`.NAME.partial-PID-*` of a dead
    process) are removed first."""
    destination = os.path.abspath(os.fspath(destination))
    parent, name = os.path.split(destination)
    if os.path.lexists(destination) and not overwrite:
        raise FileExistsError(f"{destination} already exists; pass --force (overwrite=True) to replace it")
    os.makedirs(parent, exist_ok=True)
    _remove_stale_partials(parent, name)
    tmp = tempfile.mkdtemp(prefix=f".{name}{_PARTIAL}{os.getpid()}-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would otherwise become the destination's mode
    try:
        yield tmp
        old = None
        if os.path.lexists(destination):
            old = tempfile.mkdtemp(prefix=f".{name}.replaced-", dir=parent)
            os.rename(destination, os.path.join(old, name))
        os.rename(tmp, destination)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _remove_stale_partials(parent: str, name: str) -> None:
    prefix = f".{name}{_PARTIAL}"
    for entry in os.listdir(parent):
        if not entry.startswith(prefix):
            continue
        pid = entry[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
