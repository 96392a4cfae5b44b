"""Per-task prediction files: appended as samples finish, so a killed job resumes without redoing them.

A task directory holds `predictions.jsonl` (one JSON object per finished sample: id, prompt, prediction,
target). In a multi-process run each process appends to its own `predictions.rank<i>.jsonl`; when the task
is done, process 0 merges them into `predictions.jsonl`. Readers take the union of all prediction files (by
sample id), and ignore a last line cut short by a kill.
"""

from __future__ import annotations

import glob
import json
import os
import socket
from typing import Any, Iterable

from nvila_jax.eval.formats import DataError

PREDICTIONS = "predictions.jsonl"


def write_atomic(path: str, text: str) -> None:
    """Writes a file so that it is either absent/old or complete (temporary file + rename)."""
    tmp = f"{path}.tmp-{socket.gethostname()}-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: str, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=False, ensure_ascii=False) + "\n")


def _read_records(path: str) -> list[dict]:
    """The complete records of one prediction file; a torn last line (killed mid-write) is skipped."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if n == len(lines):  # the unterminated last line of a killed writer
                continue
            raise DataError(f"{path}:{n}: corrupt prediction record") from None
    return records


class PredictionStore:
    """The prediction files of one task directory, seen from one process."""

    def __init__(self, directory: str, process_index: int = 0, process_count: int = 1):
        self.directory = directory
        name = PREDICTIONS if process_count == 1 else f"predictions.rank{process_index}.jsonl"
        self.path = os.path.join(directory, name)
        self._repaired = False

    def files(self) -> list[str]:
        return sorted(glob.glob(os.path.join(self.directory, "predictions*.jsonl")))

    def load(self) -> dict[str, dict]:
        """{sample id: record} over every prediction file of the task (first record of an id wins)."""
        done: dict[str, dict] = {}
        for path in self.files():
            for record in _read_records(path):
                done.setdefault(str(record["id"]), record)
        return done

    def append(self, records: Iterable[dict]) -> None:
        """Appends records, one line each, and makes them durable before returning."""
        os.makedirs(self.directory, exist_ok=True)
        if not self._repaired:
            self._drop_torn_tail()
            self._repaired = True
        with open(self.path, "a", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def _drop_torn_tail(self) -> None:
        """Cuts an unterminated last line left by a killed writer, so new records start on a fresh line."""
        if not os.path.isfile(self.path):
            return
        with open(self.path, "rb+") as f:
            data = f.read()
            if data and not data.endswith(b"\n"):
                f.truncate(data.rfind(b"\n") + 1)

    def merge(self, order: list[str]) -> None:
        """Process 0, after every process finished: one predictions.jsonl in sample order, rank files removed."""
        done, known = self.load(), set(order)
        ranked = [done[i] for i in order if i in done] + [r for i, r in done.items() if i not in known]
        path = os.path.join(self.directory, PREDICTIONS)
        write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ranked))
        for other in self.files():
            if other != path:
                os.remove(other)
