"""Video benchmarks: Video-MME (with and without subtitles) with NVILA's own prompts (the ones `vila-eval`
overrides lmms-eval with, NVILA_REFERENCE.md §8) and EgoSchema with NVILA's evaluation script's prompt."""

from __future__ import annotations

import glob
import os
from collections import defaultdict
from typing import Sequence

from nvila_jax.eval import metrics
from nvila_jax.eval.formats import (
    DataError,
    read_json,
    read_table,
    require_keys,
    subtitles_at_frames,
    video_frame_count_and_fps,
)
from nvila_jax.eval.tasks.base import Option, Sample, Task, check_unique, choices_block, percent, video_path

_VIDEOMME_INSTRUCTION = ("Select the best answer to the following multiple-choice question based on the video{}. "
                         "Respond with only the letter (A, B, C, or D) of the correct option.\n")


class VideoMME(Task):
    name = "videomme"
    description = "Video-MME (videomme/test-*.parquet + data/<videoID>.mp4), accuracy; N frames"
    metric = "accuracy"
    summary_metrics = ("accuracy_short", "accuracy_medium", "accuracy_long")
    max_new_tokens = 16
    default_dir = "videomme"
    subtitles = False
    options = {"frames": Option(int, None, "frames per video (default: the model's num_video_frames)"),
               "file": Option(str, None, "question table (default: the first videomme/test-*.parquet|jsonl|json)"),
               "duration": Option(str, "short+medium+long", "'+'-separated video durations to keep"),
               "frame_dir_fps": Option(float, 1.0, "frame rate of videos given as directories of frames (used "
                                                   "to place subtitles)")}

    def _table(self, d: str) -> str:
        if self.opts["file"]:
            return os.path.join(d, self.opts["file"])
        for ext in ("parquet", "jsonl", "json"):
            found = sorted(glob.glob(os.path.join(d, "videomme", f"test-*.{ext}")))
            if found:
                return found[0]
        raise DataError(f"{d}: no Video-MME question table videomme/test-*.parquet (or .jsonl/.json)")

    def load(self, data_root: str, default_num_frames: int) -> list[Sample]:
        d = self.directory(data_root)
        path, frames = self._table(d), self.opts["frames"] or default_num_frames
        keep = set(self.opts["duration"].split("+"))
        timing: dict[str, tuple[int, float]] = {}
        samples = []
        for row in read_table(path):
            where = f"{path}: question {row.get('question_id')}"
            require_keys(row, ("question_id", "videoID", "question", "options", "answer", "duration"), where)
            if row["duration"] not in keep:
                continue
            video = video_path(os.path.join(d, "data"), row["videoID"], where)
            body = f"{row['question']}\n" + "\n".join(row["options"]) + "\nThe best answer is:"
            prompt = _VIDEOMME_INSTRUCTION.format("") + body
            srt = os.path.join(d, "subtitle", row["videoID"] + ".srt")
            if self.subtitles and os.path.isfile(srt):  # without a subtitle file: the plain prompt, as NVILA
                if video not in timing:
                    timing[video] = video_frame_count_and_fps(video, self.opts["frame_dir_fps"])
                text = subtitles_at_frames(srt, *timing[video], frames)
                prompt = ("This video's subtitles are listed below:\n" + text + "\n"
                          + _VIDEOMME_INSTRUCTION.format(" and the subtitles") + body)
            samples.append(Sample(
                id=str(row["question_id"]), prompt=prompt, video=video, num_frames=frames,
                target={"answer": row["answer"], "options": [str(o) for o in row["options"]],
                        "duration": row["duration"], "domain": row.get("domain"), "task_type": row.get("task_type")},
            ))
        return check_unique(samples, path)

    def settings(self, default_num_frames: int) -> dict:
        return {**super().settings(default_num_frames), "subtitles": self.subtitles}

    def score(self, prediction: str, target: dict) -> dict:
        parsed = metrics.extract_choice(prediction, target["options"], task="videomme")
        return {"score": float(parsed.lower() == target["answer"].lower()), "parsed": parsed}

    def aggregate(self, rows: Sequence[dict]) -> dict:
        by_duration = defaultdict(list)
        for r in rows:
            by_duration[r["target"]["duration"]].append(r["score"])
        return {"score": percent(r["score"] for r in rows),
                "metrics": {f"accuracy_{k}": percent(v) for k, v in sorted(by_duration.items())}}


class VideoMMESubtitles(VideoMME):
    name = "videomme_w_subtitle"
    description = ("Video-MME with subtitles (+ subtitle/<videoID>.srt, the lines shown at the sampled frames), "
                   "accuracy; N frames")
    subtitles = True


class EgoSchema(Task):
    name = "egoschema"
    description = "EgoSchema validation subset (questions.json + subset_answers.json + videos/), accuracy"
    metric = "accuracy"
    max_new_tokens = 16
    default_dir = "egoschema"
    options = {"frames": Option(int, None, "frames per video (default: the model's num_video_frames)"),
               "videos": Option(str, "videos", "video directory (<q_uid>.mp4 or <q_uid>/ of frames)")}

    def load(self, data_root: str, default_num_frames: int) -> list[Sample]:
        d = self.directory(data_root)
        qpath, apath = os.path.join(d, "questions.json"), os.path.join(d, "subset_answers.json")
        questions, answers = read_json(qpath), read_json(apath, "answer file")
        if not isinstance(questions, list) or not isinstance(answers, dict):
            raise DataError(f"{qpath} / {apath}: expected a list of questions and a {{q_uid: answer index}} object")
        samples = []
        for q in questions:
            if q.get("q_uid") not in answers:
                continue  # the public answers cover the 500-question validation subset
            where = f"{qpath}: {q['q_uid']}"
            require_keys(q, ("question",) + tuple(f"option {i}" for i in range(5)), where)
            options = [str(q[f"option {i}"]) for i in range(5)]
            samples.append(Sample(
                id=q["q_uid"],
                # NVILA's script: the instruction, then the question, with no separator in between
                prompt="Watching the video and answer with the option's letter from the given choices directly."
                       + q["question"] + "\n" + choices_block(options) + "\n",
                target={"options": options, "answer": metrics.option_letters(options)[int(answers[q["q_uid"]])]},
                video=video_path(os.path.join(d, self.opts["videos"]), q["q_uid"], where),
                num_frames=self.opts["frames"] or default_num_frames,
            ))
        return check_unique(samples, qpath)

    def score(self, prediction: str, target: dict) -> dict:
        parsed = metrics.extract_choice(prediction, target["options"], task="egoschema")
        return {"score": float(parsed == target["answer"]), "parsed": parsed}
