"""The task registry: `make_task("videomme[frames=64]")` -> a configured Task; `parse_task_list` splits a
comma-separated list whose entries may carry bracketed options."""

from __future__ import annotations

from nvila_jax.eval.tasks.base import Option, Sample, Task
from nvila_jax.eval.tasks.generic import JSONLTask
from nvila_jax.eval.tasks.image import AI2D, GQA, MME, MMMU, POPE, ChartQA, DocVQA, InfoVQA, TextVQA, VQAv2
from nvila_jax.eval.tasks.video import EgoSchema, VideoMME, VideoMMESubtitles

TASKS: dict[str, type[Task]] = {cls.name: cls for cls in (
    TextVQA, VQAv2, DocVQA, InfoVQA, ChartQA, AI2D, MMMU, MME, POPE, GQA, VideoMME, VideoMMESubtitles, EgoSchema,
    JSONLTask,
)}


def parse_task_list(text: str) -> list[str]:
    """"a,b[x=1,y=2],c" -> ["a", "b[x=1,y=2]", "c"] (commas inside brackets belong to the options)."""
    specs, depth, current = [], 0, ""
    for ch in text:
        depth += (ch == "[") - (ch == "]")
        if depth < 0:
            raise ValueError(f"unbalanced ']' in task list {text!r}")
        if ch == "," and depth == 0:
            specs.append(current.strip())
            current = ""
        else:
            current += ch
    if depth:
        raise ValueError(f"unbalanced '[' in task list {text!r}")
    specs.append(current.strip())
    return [s for s in specs if s]


def parse_spec(spec: str) -> tuple[str, dict[str, str]]:
    """"videomme[frames=64]" -> ("videomme", {"frames": "64"})."""
    name, _, rest = spec.partition("[")
    options: dict[str, str] = {}
    if rest:
        if not rest.endswith("]"):
            raise ValueError(f"task {spec!r}: options must be written name[key=value,...]")
        for item in filter(None, (s.strip() for s in rest[:-1].split(","))):
            key, eq, value = item.partition("=")
            if not eq:
                raise ValueError(f"task {spec!r}: option {item!r} is not key=value")
            options[key.strip()] = value.strip()
    return name.strip(), options


def make_task(spec: str) -> Task:
    name, options = parse_spec(spec)
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[name](**options)


__all__ = ["TASKS", "Option", "Sample", "Task", "make_task", "parse_spec", "parse_task_list"]
