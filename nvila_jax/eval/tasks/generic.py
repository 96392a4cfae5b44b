"""A user's own benchmark as a JSON-lines file: multiple-choice or short-answer questions on images or videos.

One object per line:
    {"id": "q1", "question": "What color is the car?", "image": "imgs/1.jpg", "answer": "red"}
    {"id": "q2", "question": "Which animal?", "images": ["a.jpg", "b.jpg"], "options": ["cat", "dog"], "answer": "B"}
    {"id": "q3", "question": "What happens?", "video": "clips/3.mp4", "answers": ["jumps", "jumping"]}
Media paths are relative to the file. `id` defaults to the line number. A multiple-choice answer may be a
letter, an option index or the option's text.
"""

from __future__ import annotations

import os

from nvila_jax.eval import metrics
from nvila_jax.eval.formats import DataError, read_jsonl
from nvila_jax.eval.tasks.base import LETTER_ANSWER, SHORT_ANSWER, Option, Sample, Task, check_unique, choices_block
from nvila_jax.eval.tasks.base import image_path

_METRIC_NAMES = {"auto": "accuracy", "choice": "accuracy", "exact": "exact match", "vqa": "VQA accuracy",
                 "anls": "ANLS", "relaxed": "relaxed accuracy", "yes_no": "accuracy"}
METRICS = tuple(_METRIC_NAMES)


class JSONLTask(Task):
    name = "jsonl"
    description = "your own JSON-lines file (question, image/images/video, answer(s), optional options)"
    metric = "accuracy"
    max_new_tokens = 32
    default_dir = "."
    options = {
        "file": Option(str, None, "the JSON-lines file, relative to --data-root (or dir=) or absolute"),
        "metric": Option(str, "auto", "choice | exact (normalised exact match) | vqa | anls | relaxed | yes_no; "
                                      "auto = choice when a question has options, else exact"),
        "post_prompt": Option(str, None, "text appended to every question, \\n for a newline (default: the "
                                         "harness's short-answer or option-letter instruction)"),
        "frames": Option(int, None, "frames per video (default: the model's num_video_frames)"),
    }

    def __init__(self, **options):
        super().__init__(**options)
        if not self.opts["file"]:
            raise ValueError("task jsonl needs a file: jsonl[file=path/to/questions.jsonl]")
        if self.opts["metric"] not in METRICS:
            raise ValueError(f"task jsonl: metric must be one of {', '.join(METRICS)}, got {self.opts['metric']!r}")
        self.metric = _METRIC_NAMES[self.opts["metric"]]

    def load(self, data_root: str, default_num_frames: int) -> list[Sample]:
        path = os.path.join(data_root, self.opts["dir"] or self.default_dir, self.opts["file"])
        base = os.path.dirname(path)
        samples = []
        for n, row in enumerate(read_jsonl(path), 1):
            where = f"{path}:{n}"
            if "question" not in row:
                raise DataError(f"{where}: missing 'question'")
            options = [str(o) for o in row.get("options", [])]
            metric = self.opts["metric"]
            if metric == "auto":
                metric = "choice" if options else "exact"
            answers = row.get("answers", [row["answer"]] if "answer" in row else None)
            if not answers:
                raise DataError(f"{where}: missing 'answer' (or a non-empty 'answers' list)")
            answers = [str(a) for a in answers]
            target = {"metric": metric, "answers": answers}
            if metric == "choice":
                if not options:
                    raise DataError(f"{where}: metric 'choice' needs 'options'")
                target.update(options=options, answer=self._letter(answers[0], options, where))
                suffix = "\n" + LETTER_ANSWER
                prompt = f"{row['question']}\n{choices_block(options)}"
            else:
                suffix, prompt = SHORT_ANSWER, row["question"]
            if self.opts["post_prompt"] is not None:
                suffix = self.opts["post_prompt"].replace("\\n", "\n")
            images = row.get("images", [row["image"]] if "image" in row else [])
            video = row.get("video")
            samples.append(Sample(
                id=str(row.get("id", n)),
                prompt=prompt + suffix,
                target=target,
                images=tuple(image_path(base, im, where) for im in images),
                video=self._video(base, video, where) if video else None,
                num_frames=(self.opts["frames"] or default_num_frames) if video else None,
            ))
        return check_unique(samples, path)

    @property
    def key(self) -> str:
        stem = os.path.splitext(os.path.basename(self.opts["file"]))[0]
        extra = {k: v for k, v in self.given.items() if k != "file"}
        return f"jsonl-{stem}" + ("@" + ",".join(f"{k}={v}" for k, v in extra.items()) if extra else "")

    @staticmethod
    def _video(base: str, video: str, where: str) -> str:
        path = os.path.join(base, video)
        if not os.path.exists(path):
            raise DataError(f"{where}: video {path} not found (a video file or a directory of frames)")
        return path

    @staticmethod
    def _letter(answer: str, options: list[str], where: str) -> str:
        letters = metrics.option_letters(options)
        if answer in letters:
            return answer
        if answer.isdigit() and int(answer) < len(options):
            return letters[int(answer)]
        if answer in options:
            return letters[options.index(answer)]
        raise DataError(f"{where}: answer {answer!r} is not an option letter ({''.join(letters)}), index or text")

    def score(self, prediction: str, target: dict) -> dict:
        metric, answers = target["metric"], target["answers"]
        if metric == "choice":
            parsed = metrics.extract_choice(prediction, target["options"])
            return {"score": float(parsed == target["answer"]), "parsed": parsed}
        if metric == "yes_no":
            parsed = metrics.yes_no(prediction)
            return {"score": float(parsed == metrics.yes_no(answers[0])), "parsed": parsed}
        if metric == "exact":
            pred = metrics.normalize_vqa_answer(prediction)
            return {"score": float(any(pred == metrics.normalize_vqa_answer(a) for a in answers)), "parsed": pred}
        if metric == "vqa":
            return {"score": metrics.vqa_accuracy(prediction, answers), "parsed": None}
        if metric == "anls":
            return {"score": metrics.anls(prediction, answers), "parsed": None}
        return {"score": max(metrics.relaxed_accuracy(prediction, a) for a in answers), "parsed": None}
