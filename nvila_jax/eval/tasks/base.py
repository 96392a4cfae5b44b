"""What every benchmark task provides: samples read from the published files, the prompt NVILA is evaluated
with, generation settings, and the official per-sample metric and aggregation."""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, ClassVar, Sequence

from nvila_jax.eval.formats import DataError
from nvila_jax.eval.metrics import option_letters

# The short-answer and multiple-choice instructions of the standard harness (lmms-eval's default prompts).
SHORT_ANSWER = "\nAnswer the question using a single word or phrase."
LETTER_ANSWER = "Answer with the option's letter from the given choices directly."

ImageSource = str | bytes  # a file path, or the encoded bytes of an image stored inside a data file


@dataclasses.dataclass(frozen=True)
class Sample:
    """One benchmark question. `target` holds everything the metric needs (it is saved with the prediction,
    so scores can be recomputed from predictions.jsonl alone)."""

    id: str
    prompt: str
    target: dict[str, Any]
    images: tuple[ImageSource, ...] = ()
    video: str | None = None
    num_frames: int | None = None


@dataclasses.dataclass(frozen=True)
class Option:
    """A task option, set as `task[name=value,...]` on the command line or in an eval suite config."""

    type: type
    default: Any
    help: str


class Task:
    """Base class: subclasses set the class attributes and implement `load` and `score`."""

    name: ClassVar[str]
    description: ClassVar[str]
    metric: ClassVar[str]  # the primary metric, as shown in the summary table
    max_new_tokens: ClassVar[int]
    default_dir: ClassVar[str]  # the benchmark's directory under --data-root
    options: ClassVar[dict[str, Option]] = {}
    summary_metrics: ClassVar[tuple[str, ...]] = ()  # secondary metrics shown in the summary table

    common_options: ClassVar[dict[str, Option]] = {
        "dir": Option(str, None, "the benchmark's directory, relative to --data-root (or absolute)"),
        "max_new_tokens": Option(int, None, "generation length limit (default: the task's)"),
    }

    def __init__(self, **options: Any):
        known = {**self.common_options, **self.options}
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise ValueError(f"task {self.name}: unknown option(s) {', '.join(unknown)}; known: {', '.join(known)}")
        self.opts: dict[str, Any] = {}
        for key, opt in known.items():
            value = options.get(key, opt.default)
            if value is not None and not isinstance(value, opt.type):
                try:
                    value = opt.type(value)
                except (TypeError, ValueError):
                    raise ValueError(f"task {self.name}: option {key}={value!r} is not a valid "
                                     f"{opt.type.__name__}") from None
            self.opts[key] = value
        self.given = {k: self.opts[k] for k in sorted(options)}

    # ---------------------------------------------------------------------------------------------- naming
    @property
    def key(self) -> str:
        """The results directory name: the task name plus the options given, file-system safe."""
        if not self.given:
            return self.name
        suffix = ",".join(f"{k}={v}" for k, v in self.given.items())
        return re.sub(r"[^A-Za-z0-9._=,+@-]+", "_", f"{self.name}@{suffix}").strip("_")

    @property
    def spec(self) -> str:
        """The task as written on the command line, `name[key=value,...]` (recreates it with make_task)."""
        if not self.given:
            return self.name
        return f"{self.name}[{','.join(f'{k}={v}' for k, v in self.given.items())}]"

    @property
    def generation_length(self) -> int:
        return self.opts["max_new_tokens"] or self.max_new_tokens

    def settings(self, default_num_frames: int) -> dict[str, Any]:
        """What determines the predictions (checked when a run resumes)."""
        out = {"task": self.name, "options": dict(self.given), "max_new_tokens": self.generation_length}
        if "frames" in self.opts:
            out["frames"] = self.opts["frames"] or default_num_frames
        return out

    def directory(self, data_root: str) -> str:
        path = os.path.join(data_root, self.opts["dir"] or self.default_dir)
        if not os.path.isdir(path):
            raise DataError(f"{self.name}: data directory {path} not found (expected the benchmark's files under "
                            f"--data-root/{self.opts['dir'] or self.default_dir}; see docs/eval.md)")
        return path

    # ---------------------------------------------------------------------------------------------- interface
    def load(self, data_root: str, default_num_frames: int) -> list[Sample]:
        """All samples, in a fixed order, with unique ids."""
        raise NotImplementedError

    def score(self, prediction: str, target: dict[str, Any]) -> dict[str, Any]:
        """{"score": float in [0, 1], "parsed": the extracted answer (or None)} for one prediction."""
        raise NotImplementedError

    def aggregate(self, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """{"score": primary metric, "metrics": {...}} over scored rows (each has target, score, parsed)."""
        return {"score": percent(r["score"] for r in rows), "metrics": {}}


def percent(values) -> float:
    values = list(values)
    return 100.0 * sum(values) / len(values) if values else 0.0


def check_unique(samples: list[Sample], where: str) -> list[Sample]:
    seen: set[str] = set()
    for s in samples:
        if s.id in seen:
            raise DataError(f"{where}: duplicate sample id {s.id!r}")
        seen.add(s.id)
    if not samples:
        raise DataError(f"{where}: no samples")
    return samples


def image_path(directory: str, relative: str, where: str) -> str:
    path = os.path.normpath(os.path.join(directory, relative))
    if not os.path.isfile(path):
        raise DataError(f"{where}: image {path} not found")
    return path


def video_path(directory: str, stem: str, where: str) -> str:
    """A video file <stem>.mp4/.MP4/.mkv/.webm, or a directory <stem>/ of frame images."""
    for candidate in (stem + ext for ext in (".mp4", ".MP4", ".mkv", ".webm")):
        if os.path.isfile(os.path.join(directory, candidate)):
            return os.path.join(directory, candidate)
    if os.path.isdir(os.path.join(directory, stem)):
        return os.path.join(directory, stem)
    raise DataError(f"{where}: video {os.path.join(directory, stem)}(.mp4|.MP4|.mkv|.webm|/) not found")


def choices_block(options: Sequence[str]) -> str:
    """"A. first\\nB. second ..." as lmms-eval lists options."""
    return "\n".join(f"{letter}. {option}" for letter, option in zip(option_letters(options), options))
