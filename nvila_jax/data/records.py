"""LLaVA-style training records: JSON (a list) or JSONL (one object per line) files.

A record has `conversations` (a list of {"from": "human"|"gpt", "value": text}) and optionally media paths
relative to the dataset's media directory: `image` (a path or a list), `images` (a list) or `video` (a video
file or a directory of frame images). Records are read lazily by index; a record that cannot be used raises
RecordError when it is read, so the pipeline can skip and count it instead of failing the run.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

import numpy as np

from nvila_jax.data.conversation import Turn


class RecordError(ValueError):
    """A record that is not a usable LLaVA-style example (the message names the field)."""


class DatasetFileError(ValueError):
    """A dataset file that cannot be read at all."""


@dataclasses.dataclass(frozen=True)
class Record:
    turns: tuple[Turn, ...]
    images: tuple[str, ...] = ()
    video: str | None = None
    id: str | None = None


def parse_record(raw: Any) -> Record:
    """A raw JSON object -> Record, with a RecordError naming the field that is wrong."""
    if not isinstance(raw, dict):
        raise RecordError(f"a record must be a JSON object, got {type(raw).__name__}")
    conv = raw.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise RecordError("'conversations' must be a non-empty list of {'from', 'value'} turns")
    turns = []
    for i, t in enumerate(conv):
        if not isinstance(t, dict) or not isinstance(t.get("from"), str) or not isinstance(t.get("value"), str):
            raise RecordError(f"conversations[{i}] must be an object with string 'from' and 'value'")
        turns.append(Turn(t["from"], t["value"]))
    images: list[str] = []
    for key in ("image", "images"):
        value = raw.get(key)
        if value is None:
            continue
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(p, str) and p for p in items):
            raise RecordError(f"'{key}' must be a path or a list of paths")
        images += items
    video = raw.get("video")
    if isinstance(video, list) and len(video) == 1:
        video = video[0]
    if video is not None and not (isinstance(video, str) and video):
        raise RecordError("'video' must be one path (a video file or a directory of frames)")
    rid = raw.get("id")
    return Record(tuple(turns), tuple(images), video, None if rid is None else str(rid))


class RecordFile(Sequence):
    """Random access to the raw records of a .json (list) or .jsonl file.

    JSONL files are indexed by line offsets and read on demand, so large files are not held in memory; a
    line that is not valid JSON raises RecordError when read.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise DatasetFileError(f"{self.path}: dataset file not found")
        self._records: list | None = None
        self._offsets: np.ndarray | None = None
        self._fd: int | None = None
        if self.path.endswith(".jsonl"):
            self._offsets = _line_offsets(self.path)
            self._size = os.path.getsize(self.path)
        else:
            try:
                with open(self.path, encoding="utf-8") as f:
                    data = json.load(f)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise DatasetFileError(f"{self.path}: not valid JSON ({e}); use .jsonl for one record per line") from None
            if not isinstance(data, list):
                raise DatasetFileError(f"{self.path}: expected a JSON list of records, got {type(data).__name__}")
            self._records = data

    def __len__(self) -> int:
        return len(self._records) if self._records is not None else len(self._offsets)

    def __getstate__(self) -> dict:  # sent to grain worker processes: without the open descriptor
        return {**self.__dict__, "_fd": None}

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)

    def __getitem__(self, index: int) -> Any:
        if self._records is not None:
            return self._records[index]
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        start = int(self._offsets[index])
        end = int(self._offsets[index + 1]) if index + 1 < len(self._offsets) else self._size
        line = os.pread(self._fd, end - start, start)  # positional: safe from several reader threads
        try:
            return json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RecordError(f"line {index + 1} is not valid JSON ({e})") from None


def _line_offsets(path: str) -> np.ndarray:
    """Byte offsets of the non-blank lines of a file."""
    offsets = []
    with open(path, "rb") as f:
        pos = 0
        for line in f:
            if line.strip():
                offsets.append(pos)
            pos += len(line)
    return np.asarray(offsets, np.int64)
