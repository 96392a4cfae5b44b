"""Dataset mixtures: which datasets, with which weights, minus DeltaLoss drop lists.

A mixture is a YAML file, a list of entries, or a mapping with `datasets` (and optionally `slice_folder`):

    slice_folder: drop_lists          # where `name@fraction` drop lists live (default $NVILA_SLICE_FOLDER)
    datasets:
      - {name: llava_pretrain, path: blip_558k.json, media_dir: images}
      - {name: sharegpt4v@0.5, path: sharegpt4v.jsonl, weight: 2.0, no_system_prompt: true}

`name@fraction` is the reference's DeltaLoss syntax: the records listed in
`<slice_folder>/<fraction>/<name>.json` (a JSON list of record indices, written by `nvila-jax prune`) are
dropped. Weights are sampling proportions; without weights a dataset is drawn in proportion to its size, which
is the reference's plain concatenation. Relative paths are resolved against the YAML file's directory.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Mapping, Sequence

import numpy as np

from nvila_jax.data.records import DatasetFileError, RecordError, RecordFile

_NAME = re.compile(r"(?P<name>[^@]+)(@(?P<fraction>[0-9.]+))?")


class MixtureError(ValueError):
    """A mixture spec that cannot be used (the message names the entry and field)."""


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    name: str
    path: str
    media_dir: str
    weight: float | None = None
    fraction: str | None = None  # DeltaLoss: drop the records listed for this fraction
    no_system_prompt: bool = False

    @property
    def full_name(self) -> str:
        return self.name + (f"@{self.fraction}" if self.fraction else "")


@dataclasses.dataclass(frozen=True)
class Mixture:
    datasets: tuple[DatasetSpec, ...]
    slice_folder: str | None = None


def load_mixture(spec: Any, base_dir: str | None = None) -> Mixture:
    """A Mixture from a YAML path, a list of entries or a mapping with `datasets` (ConfigDicts work too)."""
    if isinstance(spec, (str, os.PathLike)):
        path = os.fspath(spec)
        if not os.path.isfile(path):
            raise MixtureError(f"{path}: mixture file not found")
        import yaml

        with open(path, encoding="utf-8") as f:
            try:
                spec = yaml.safe_load(f)
            except yaml.YAMLError as e:
                raise MixtureError(f"{path}: not valid YAML ({e})") from None
        base_dir = os.path.dirname(os.path.abspath(path))
    spec = _plain(spec)
    slice_folder = None
    if isinstance(spec, Mapping):
        unknown = set(spec) - {"datasets", "slice_folder"}
        if unknown:
            raise MixtureError(f"mixture has unknown keys {sorted(unknown)}; expected 'datasets' and 'slice_folder'")
        slice_folder = spec.get("slice_folder")
        spec = spec.get("datasets")
    if not isinstance(spec, (list, tuple)) or not spec:
        raise MixtureError("a mixture needs a non-empty list of datasets")
    resolve = lambda p: p if base_dir is None or os.path.isabs(p) else os.path.join(base_dir, p)
    slice_folder = slice_folder or os.environ.get("NVILA_SLICE_FOLDER")
    datasets = tuple(_dataset_spec(i, e, resolve) for i, e in enumerate(spec))
    names = [d.name for d in datasets]
    if len(set(names)) != len(names):
        raise MixtureError(f"dataset names must be unique, got {names}")
    return Mixture(datasets, resolve(slice_folder) if slice_folder else None)


def _plain(x: Any) -> Any:
    """ConfigDict / FrozenConfigDict / tuples -> plain dicts and lists."""
    if hasattr(x, "to_dict"):
        x = x.to_dict()
    if isinstance(x, Mapping):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def _dataset_spec(i: int, entry: Any, resolve) -> DatasetSpec:
    where = f"mixture entry {i}"
    if not isinstance(entry, Mapping):
        raise MixtureError(f"{where}: expected a mapping with 'name' and 'path', got {entry!r}")
    unknown = set(entry) - {"name", "path", "media_dir", "weight", "no_system_prompt"}
    if unknown:
        raise MixtureError(f"{where}: unknown keys {sorted(unknown)}")
    for key in ("name", "path"):
        if not isinstance(entry.get(key), str) or not entry[key]:
            raise MixtureError(f"{where}: '{key}' must be a non-empty string")
    m = _NAME.fullmatch(entry["name"])
    if not m:
        raise MixtureError(f"{where}: name {entry['name']!r} must be 'name' or 'name@fraction'")
    weight = entry.get("weight")
    if weight is not None and not (isinstance(weight, (int, float)) and weight > 0):
        raise MixtureError(f"{where}: 'weight' must be a positive number, got {weight!r}")
    path = resolve(entry["path"])
    media_dir = resolve(entry["media_dir"]) if entry.get("media_dir") else os.path.dirname(path)
    return DatasetSpec(m["name"], path, media_dir, None if weight is None else float(weight), m["fraction"],
                       bool(entry.get("no_system_prompt", False)))


def drop_list_path(slice_folder: str, fraction: str, name: str) -> str:
    return os.path.join(slice_folder, fraction, f"{name}.json")


def kept_indices(spec: DatasetSpec, num_records: int, slice_folder: str | None) -> np.ndarray:
    """Indices of the records a dataset contributes: all, minus its DeltaLoss drop list when it has one."""
    keep = np.ones(num_records, bool)
    if spec.fraction is not None:
        if slice_folder is None:
            raise MixtureError(f"{spec.full_name}: a drop list needs `slice_folder` in the mixture or "
                               "$NVILA_SLICE_FOLDER")
        path = drop_list_path(slice_folder, spec.fraction, spec.name)
        try:
            with open(path, encoding="utf-8") as f:
                dropped = json.load(f)
        except FileNotFoundError:
            raise MixtureError(f"{spec.full_name}: drop list {path} not found (write it with `nvila-jax prune`)") from None
        except json.JSONDecodeError as e:
            raise MixtureError(f"{path}: not valid JSON ({e})") from None
        dropped = np.asarray(dropped, np.int64).reshape(-1)
        if dropped.size and (dropped.min() < 0 or dropped.max() >= num_records):
            raise MixtureError(f"{path}: indices must be in [0, {num_records}) for {spec.path}")
        keep[dropped] = False
    return np.flatnonzero(keep)


@dataclasses.dataclass(frozen=True)
class RawExample:
    """One record as read from its file, before decoding: raw JSON or the error reading it."""

    dataset: int
    index: int
    raw: Any = None
    error: str | None = None


class DatasetSource(Sequence):
    """grain data source: the kept records of one dataset, yielding RawExample (never raising on bad lines)."""

    def __init__(self, dataset: int, spec: DatasetSpec, slice_folder: str | None) -> None:
        self.dataset = dataset
        self.spec = spec
        try:
            self.records = RecordFile(spec.path)
        except DatasetFileError as e:
            raise MixtureError(f"dataset {spec.full_name}: {e}") from None
        self.indices = kept_indices(spec, len(self.records), slice_folder)
        if not len(self.indices):
            raise MixtureError(f"dataset {spec.full_name} ({spec.path}) has no records")

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> RawExample:
        index = int(self.indices[i])
        try:
            return RawExample(self.dataset, index, self.records[index])
        except RecordError as e:
            return RawExample(self.dataset, index, error=str(e))


def mixture_weights(mixture: Mixture, sizes: Sequence[int]) -> list[float]:
    """Sampling proportions: the given weights, else dataset sizes (a plain concatenation)."""
    given = [d.weight for d in mixture.datasets]
    if all(w is None for w in given):
        return [float(s) for s in sizes]
    if any(w is None for w in given):
        missing = [d.full_name for d in mixture.datasets if d.weight is None]
        raise MixtureError(f"either every dataset has a weight or none does; missing for {missing}")
    return [float(w) for w in given]
