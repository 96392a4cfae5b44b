"""Readers for the file formats the benchmarks are published in (JSON, JSON lines, Parquet, SRT subtitles) and
the video timing the subtitle selection needs. Every error names the file and what was expected."""

from __future__ import annotations

import glob
import json
import os
import re
from typing import Any

from nvila_jax.media.video import frame_indices


class DataError(ValueError):
    """A benchmark file that is missing or not in the expected format."""


def require_file(path: str, what: str) -> str:
    if not os.path.isfile(path):
        raise DataError(f"{path}: {what} not found")
    return path


def read_json(path: str, what: str = "annotation file") -> Any:
    require_file(path, what)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None


def read_jsonl(path: str, what: str = "annotation file") -> list[dict]:
    """One JSON object per non-empty line (POPE, the generic task)."""
    require_file(path, what)
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{n}: not valid JSON ({e})") from None
                if not isinstance(row, dict):
                    raise DataError(f"{path}:{n}: expected a JSON object per line, got {type(row).__name__}")
                rows.append(row)
    return rows


def read_table(path: str) -> list[dict]:
    """Rows of a Parquet file (the Hugging Face releases of MMMU and Video-MME) or of a JSON / JSON-lines export
    with the same columns."""
    if path.endswith(".jsonl"):
        return read_jsonl(path)
    if path.endswith(".json"):
        rows = read_json(path)
        if not isinstance(rows, list):
            raise DataError(f"{path}: expected a JSON list of rows")
        return rows
    require_file(path, "Parquet file")
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow), or convert the file to "
                        "JSON lines with the same columns") from None
    return pq.read_table(path).to_pylist()


def first_existing(root: str, candidates: tuple[str, ...], what: str) -> str:
    """The first of `candidates` (paths relative to root) that exists, or an error listing them all."""
    for candidate in candidates:
        if os.path.exists(os.path.join(root, candidate)):
            return candidate
    raise DataError(f"{root}: no {what} (looked for {', '.join(candidates)})")


def find_files(root: str, pattern: str, what: str) -> list[str]:
    """Sorted files matching a glob pattern under root (recursive), or a clear error."""
    found = sorted(glob.glob(os.path.join(root, pattern), recursive=True))
    if not found:
        raise DataError(f"{root}: no {what} matching {pattern!r}")
    return found


def require_keys(row: dict, keys: tuple[str, ...], where: str) -> None:
    missing = [k for k in keys if k not in row]
    if missing:
        raise DataError(f"{where}: missing field(s) {', '.join(missing)} (has: {', '.join(sorted(row))})")


# ---------------------------------------------------------------------------------------------------------
# SRT subtitles and video timing (Video-MME with subtitles)

def _srt_seconds(stamp: str) -> float:
    hours, minutes, rest = stamp.split(":")
    seconds, millis = rest.split(",")
    return int(hours) * 3600 + int(minutes) * 60 + int(seconds) + int(millis) / 1000


def read_srt(path: str) -> dict[tuple[float, float], str]:
    """{(start s, end s): text} with the reference's parsing: blocks separated by blank lines, the second line is
    the time range, the rest is the text joined by spaces; a repeated time range keeps its first position and
    the last text (a dict, as the reference)."""
    require_file(path, "subtitle file")
    with open(path, encoding="utf-8") as f:
        blocks = f.read().split("\n\n")
    subtitles: dict[tuple[float, float], str] = {}
    for block in blocks:
        lines = block.split("\n")
        if block.strip() and len(lines) >= 3:
            try:
                start, end = (_srt_seconds(t) for t in lines[1].split(" --> "))
            except ValueError:
                raise DataError(f"{path}: bad subtitle time range {lines[1]!r} (expected HH:MM:SS,mmm --> "
                                "HH:MM:SS,mmm)") from None
            subtitles[(start, end)] = " ".join(lines[2:])
    return subtitles


def video_frame_count_and_fps(path: str, frame_dir_fps: float) -> tuple[int, float]:
    """(frame count, frames per second) as the container reports them; a directory of frame images has one
    frame per file at `frame_dir_fps`."""
    if os.path.isdir(path):
        return len(glob.glob(os.path.join(path, "*"))), frame_dir_fps
    require_file(path, "video")
    import av

    try:
        with av.open(path) as container:
            stream = container.streams.video[0]
            count, rate = stream.frames, stream.average_rate
            if not count and stream.duration is not None and rate:
                count = int(stream.duration * stream.time_base * rate)
    except (av.error.FFmpegError, IndexError) as e:
        raise DataError(f"{path}: cannot read the video's frame count and rate ({e})") from None
    if not count or not rate:
        raise DataError(f"{path}: the container reports no frame count / frame rate")
    return int(count), float(rate)


_SUBTITLE_TEXT = re.compile(r'<font color="white" size=".72c">(.*?)</font>')


def subtitles_at_frames(subtitle_path: str, frame_count: int, fps: float, num_frames: int) -> str:
    """The subtitle lines shown at the sampled frames, as NVILA's Video-MME prompt builds them: frames at
    round(linspace(0, count - 1, N)), every subtitle whose [start, end) frame span holds one of them (the
    reference's `list(set(...))` order), the text inside its <font> tag, joined by newlines."""
    spans = [(int(start * fps), int(end * fps), text) for (start, end), text in read_srt(subtitle_path).items()]
    hits = [i for frame in frame_indices(frame_count, num_frames)
            for i, (start, end, _) in enumerate(spans) if start <= frame < end]
    texts = []
    for i in list(set(hits)):
        found = _SUBTITLE_TEXT.findall(spans[i][2])
        if found:
            texts.append(found[0])
    return "\n".join(texts)

