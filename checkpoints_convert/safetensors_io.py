"""The safetensors format read and written one tensor at a time with plain file I/O.

`safetensors.safe_open` memory-maps the whole file, and every page it touches counts as resident memory of the
converter until the file is closed (a 4 GB shard costs 4 GB of RSS). This module parses the same format (an
8-byte little-endian header length, a JSON header {key: {dtype, shape, data_offsets}}, then the raw bytes)
and reads each tensor, or a block of its rows, with `pread` into a fresh buffer, so memory stays bounded by
the block being converted. Nothing is ever unpickled. The writer streams tensors into a file in the same
format, header first.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
from typing import Iterable, Mapping

import ml_dtypes
import numpy as np

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the limit the safetensors library enforces


class SafetensorsError(ValueError):
    """A file that is not a complete, well-formed safetensors file."""


@dataclasses.dataclass(frozen=True)
class TensorRef:
    """Where one tensor lives: file, key, dtype name (e.g. "BF16"), shape and absolute byte range."""

    file: str
    key: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def np_dtype(self) -> np.dtype:
        return DTYPES[self.dtype]

    def read(self, rows: slice | None = None) -> np.ndarray:
        """The tensor (or rows `rows` of its first axis) as a new array, read with pread (no mmap)."""
        start, stop = (0, self.shape[0] if self.shape else 1) if rows is None else (rows.start, rows.stop)
        row_bytes = self.nbytes // max(1, self.shape[0]) if self.shape else self.nbytes
        shape = ((stop - start,) + self.shape[1:]) if self.shape else ()
        out = np.empty(shape, self.np_dtype)
        want = out.nbytes
        fd = os.open(self.file, os.O_RDONLY)
        try:
            got = os.preadv(fd, [memoryview(out.reshape(-1).view(np.uint8))], self.begin + start * row_bytes)
        finally:
            os.close(fd)
        if got != want:
            raise SafetensorsError(f"{self.file}: tensor {self.key!r} is cut short ({got} of {want} bytes); "
                                   "the file is truncated")
        return out


@dataclasses.dataclass(frozen=True)
class SafetensorsHeader:
    """The parsed header of one file: its tensors in file order and its `__metadata__`."""

    path: str
    tensors: dict[str, TensorRef]
    metadata: dict[str, str]


def read_header(path: str) -> SafetensorsHeader:
    """Parses and checks a safetensors header (sizes, dtypes, offsets inside the file); raises
    SafetensorsError naming the file and the problem."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise SafetensorsError(f"{path}: {size} bytes, too short to be a safetensors file")
            (n,) = struct.unpack("<Q", head)
            if n > min(MAX_HEADER_BYTES, size - 8):
                raise SafetensorsError(f"{path}: header length {n} exceeds the file ({size} bytes); the file is "
                                       "truncated or not a safetensors file")
            raw = f.read(n)
    except OSError as e:
        raise SafetensorsError(f"{path}: cannot be read ({e.strerror or e})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SafetensorsError(f"{path}: the header is not valid JSON ({e}); not a safetensors file") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: the header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    base = 8 + n
    tensors: dict[str, TensorRef] = {}
    for key, entry in header.items():
        try:
            dtype, shape, (b, e) = entry["dtype"], tuple(int(s) for s in entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise SafetensorsError(f"{path}: malformed header entry for {key!r}: {entry!r}") from None
        if dtype not in DTYPES:
            raise SafetensorsError(f"{path}: tensor {key!r} has unsupported dtype {dtype!r}")
        if e - b != math.prod(shape) * DTYPES[dtype].itemsize or b < 0:
            raise SafetensorsError(f"{path}: tensor {key!r} byte range {b}..{e} does not match its shape {shape} "
                                   f"and dtype {dtype}")
        if base + e > size:
            raise SafetensorsError(f"{path}: tensor {key!r} ends at byte {base + e} but the file has {size} bytes; "
                                   "the file is truncated")
        tensors[key] = TensorRef(path, key, dtype, shape, base + b, base + e)
    tensors = dict(sorted(tensors.items(), key=lambda kv: kv[1].begin))
    return SafetensorsHeader(path, tensors, dict(metadata))


class StreamingWriter:
    """Writes one safetensors file tensor by tensor: the header (all names, dtypes and shapes) is known up
    front, each tensor's bytes are appended as they are produced (in the header's order)."""

    def __init__(self, path: str, entries: Iterable[tuple[str, str, tuple[int, ...]]],
                 metadata: Mapping[str, str] | None = None):
        self.path = path
        self._order: list[tuple[str, str, tuple[int, ...]]] = list(entries)
        header: dict = {}
        if metadata:
            header["__metadata__"] = dict(metadata)
        offset = 0
        for key, dtype, shape in self._order:
            nbytes = math.prod(shape) * DTYPES[dtype].itemsize
            header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned, as the library writes it
        self._file = open(path, "wb")
        self._file.write(struct.pack("<Q", len(raw)) + raw)
        self._next = 0

    def write(self, key: str, value: np.ndarray) -> None:
        want_key, dtype, shape = self._order[self._next]
        if key != want_key or tuple(value.shape) != shape or DTYPE_NAMES.get(value.dtype) != dtype:
            raise ValueError(f"{self.path}: expected {want_key} {dtype}{list(shape)} next, got {key} "
                             f"{value.dtype}{list(value.shape)}")
        self._file.write(np.ascontiguousarray(value).reshape(-1).view(np.uint8).data)
        self._next += 1

    def close(self) -> None:
        if self._next != len(self._order):
            self._file.close()
            raise ValueError(f"{self.path}: {len(self._order) - self._next} tensors were never written")
        self._file.close()

    def __enter__(self) -> "StreamingWriter":
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            self.close()
        else:
            self._file.close()
