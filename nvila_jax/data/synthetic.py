"""A synthetic image-question-answer dataset: coloured shapes drawn with PIL, questions about colour, shape,
count and position with one-word answers. Used by `nvila-jax demo`, configs/tiny.py and the tests.

Generation is deterministic in the seed; scenes vary in aspect ratio so that Dynamic-S2 picks different grids.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Sequence

import numpy as np
import PIL.Image
import PIL.ImageDraw

COLORS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (40, 70, 230), "yellow": (240, 210, 20),
          "purple": (140, 40, 180), "orange": (250, 130, 0)}
SHAPES = ("circle", "square", "triangle", "cross")
NUMBERS = ("zero", "one", "two", "three")
SIZES = ((112, 112), (150, 112), (112, 150), (168, 96), (96, 168))
QUESTION_KINDS = ("color", "shape", "count", "position")
# Answers a question kind can have: chance accuracy is 1 / len(options).
ANSWER_OPTIONS = {"color": tuple(COLORS), "shape": SHAPES, "count": NUMBERS[1:], "position": ("left", "right")}


@dataclasses.dataclass(frozen=True)
class Shape:
    kind: str
    color: str
    cx: float
    cy: float
    r: float


@dataclasses.dataclass(frozen=True)
class QA:
    kind: str
    question: str
    answer: str


def random_scene(rng: np.random.RandomState, max_objects: int = 3) -> tuple[tuple[int, int], list[Shape]]:
    """Image size and 1..max_objects non-overlapping shapes with distinct (shape, colour) pairs."""
    w, h = SIZES[rng.randint(len(SIZES))]
    n = rng.randint(1, max_objects + 1)
    shapes: list[Shape] = []
    for _ in range(200):
        if len(shapes) == n:
            break
        r = float(rng.uniform(16, 24))
        cx, cy = float(rng.uniform(r, w - r)), float(rng.uniform(r, h - r))
        kind, color = SHAPES[rng.randint(len(SHAPES))], list(COLORS)[rng.randint(len(COLORS))]
        if any((s.kind, s.color) == (kind, color) or np.hypot(s.cx - cx, s.cy - cy) < s.r + r + 4 for s in shapes):
            continue
        shapes.append(Shape(kind, color, cx, cy, r))
    return (w, h), shapes


def draw(size: tuple[int, int], shapes: Sequence[Shape]) -> PIL.Image.Image:
    img = PIL.Image.new("RGB", size, (235, 235, 235))
    d = PIL.ImageDraw.Draw(img)
    for s in shapes:
        fill, (x, y, r) = COLORS[s.color], (s.cx, s.cy, s.r)
        if s.kind == "circle":
            d.ellipse((x - r, y - r, x + r, y + r), fill=fill)
        elif s.kind == "square":
            q = r * 0.85
            d.rectangle((x - q, y - q, x + q, y + q), fill=fill)
        elif s.kind == "triangle":
            d.polygon([(x, y - r), (x - r, y + r * 0.8), (x + r, y + r * 0.8)], fill=fill)
        else:
            t = r * 0.35
            d.rectangle((x - r, y - t, x + r, y + t), fill=fill)
            d.rectangle((x - t, y - r, x + t, y + r), fill=fill)
    return img


def questions(size: tuple[int, int], shapes: Sequence[Shape]) -> list[QA]:
    """Every unambiguous question about a scene (at most one per kind)."""
    out = [QA("count", "How many shapes are there?", NUMBERS[len(shapes)])]
    unique_kind = [s for s in shapes if sum(t.kind == s.kind for t in shapes) == 1]
    if unique_kind:
        s = unique_kind[0]
        out.append(QA("color", f"What color is the {s.kind}?", s.color))
    unique_color = [s for s in shapes if sum(t.color == s.color for t in shapes) == 1]
    if unique_color:
        s = unique_color[0]
        out.append(QA("shape", f"Which shape is {s.color}?", s.kind))
    w = size[0]
    sides = [s for s in shapes if abs(s.cx - w / 2) > s.r]
    if sides:
        s = sides[0]
        out.append(QA("position", f"Is the {s.color} {s.kind} on the left or right?",
                      "left" if s.cx < w / 2 else "right"))
    return out


def write_dataset(out_dir: str, num_records: int, seed: int, max_turns: int = 4) -> str:
    """Writes `num_records` images and `data.jsonl` (LLaVA format: up to max_turns questions per image, each
    kind at most once, in random order) into
    out_dir, atomically; returns the JSONL path. Reuses a complete earlier dataset with the same arguments."""
    path = os.path.join(out_dir, "data.jsonl")
    stamp = os.path.join(out_dir, "spec.json")
    spec = {"num_records": num_records, "seed": seed, "max_turns": max_turns, "version": 3}
    if os.path.isfile(path) and os.path.isfile(stamp):
        with open(stamp) as f:
            if json.load(f) == spec:
                return path
    tmp = f"{out_dir}.tmp{os.getpid()}"
    os.makedirs(os.path.join(tmp, "images"), exist_ok=True)
    rng = np.random.RandomState(seed)
    with open(os.path.join(tmp, "data.jsonl"), "w") as f:
        for i in range(num_records):
            size, shapes = random_scene(rng)
            name = f"images/{i:06d}.png"
            draw(size, shapes).save(os.path.join(tmp, name))
            qas = questions(size, shapes)
            order = rng.permutation(len(qas))[:max_turns]
            turns = []
            for j, q in enumerate(order):
                turns.append({"from": "human", "value": ("<image>\n" if j == 0 else "") + qas[q].question})
                turns.append({"from": "gpt", "value": qas[q].answer})
            f.write(json.dumps({"id": str(i), "image": name, "conversations": turns}) + "\n")
    with open(os.path.join(tmp, "spec.json"), "w") as f:
        json.dump(spec, f)
    if os.path.isdir(out_dir):
        import shutil

        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return path


def evaluation_set(num: int, seed: int) -> list[tuple[PIL.Image.Image, QA]]:
    """`num` (image, question) pairs from scenes drawn with another seed than training, kinds balanced."""
    rng = np.random.RandomState(seed)
    out: list[tuple[PIL.Image.Image, QA]] = []
    while len(out) < num:
        kind = QUESTION_KINDS[len(out) % len(QUESTION_KINDS)]
        size, shapes = random_scene(rng)
        qa = [q for q in questions(size, shapes) if q.kind == kind]
        if qa:
            out.append((draw(size, shapes), qa[0]))
    return out
