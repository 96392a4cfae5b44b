"""Run metrics: DIR/metrics.jsonl (one JSON object per logged step), TensorBoard event files in
DIR/tensorboard, and a progress line on stdout. Only process 0 writes.

On resume, lines after the restored step are dropped (the killed run may have logged steps it never
checkpointed) and TensorBoard purges the same steps, so the files read as one uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Mapping

METRICS_FILE = "metrics.jsonl"


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    """The logged steps of a run (complete lines only)."""
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.isfile(path):
        return []
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut by a kill: nothing after it is trusted
    return out


def truncate_metrics(workdir: str, last_step: int) -> None:
    """Keeps the lines of steps <= last_step (atomically)."""
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.isfile(path):
        return
    kept = [m for m in read_metrics(workdir) if m.get("step", 0) <= last_step]
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(m) + "\n" for m in kept)
    os.replace(tmp, path)


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class MetricsLogger:
    def __init__(self, workdir: str, total_steps: int, start_step: int, enabled: bool = True,
                 tensorboard: bool = True, stream=None):
        self.workdir, self.total, self.enabled = workdir, total_steps, enabled
        self.stream = stream or sys.stdout
        self._writer = None
        self._t0, self._step0 = time.perf_counter(), start_step
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        truncate_metrics(workdir, start_step)
        self._file = open(os.path.join(workdir, METRICS_FILE), "a", encoding="utf-8")
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._writer = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=start_step + 1,
                                         flush_secs=30)

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Appends one line to metrics.jsonl and writes the scalars to TensorBoard."""
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._writer is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._writer.add_scalar(k, v, step)

    def progress(self, step: int, metrics: Mapping[str, Any]) -> None:
        """step, loss, tokens/s, MFU and ETA on one line."""
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self._t0
        done = max(step - self._step0, 1)
        eta = elapsed / done * (self.total - step)
        parts = [f"step {step}/{self.total}", f"loss {metrics['loss']:.4f}"]
        if "tokens_per_s" in metrics:
            parts.append(f"{metrics['tokens_per_s']:,.0f} tok/s")
        if "mfu" in metrics:
            parts.append(f"MFU {100 * metrics['mfu']:.1f}%")
        parts.append(f"ETA {format_duration(eta)}")
        print(" | ".join(parts), file=self.stream, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._writer is not None:
            self._writer.close()


def _plain(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v
