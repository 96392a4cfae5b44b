"""Image benchmarks, each read from its published release files. Prompts and generation lengths follow
lmms-eval's default task configs (the harness NVILA's `vila-eval` runs); metrics follow its task utils."""

from __future__ import annotations

import ast
import glob
import os
import re
from collections import defaultdict
from typing import Any, Sequence

from nvila_jax.eval import metrics
from nvila_jax.eval.formats import (
    DataError,
    find_files,
    first_existing,
    read_json,
    read_jsonl,
    read_table,
    require_file,
    require_keys,
)
from nvila_jax.eval.tasks.base import (
    LETTER_ANSWER,
    SHORT_ANSWER,
    Option,
    Sample,
    Task,
    check_unique,
    choices_block,
    image_path,
    percent,
)


def _rows(data: Any, path: str, key: str = "data") -> list[dict]:
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
        raise DataError(f"{path}: expected a JSON object with a {key!r} list")
    return data[key]


def _answers(row: dict, where: str) -> list[str]:
    answers = row["answers"]
    if not isinstance(answers, list) or not answers:
        raise DataError(f"{where}: 'answers' must be a non-empty list")
    return [str(a) for a in answers]


class TextVQA(Task):
    name = "textvqa"
    description = "TextVQA val (TextVQA_0.5.1_val.json + train_images/), VQA accuracy"
    metric = "VQA accuracy"
    max_new_tokens = 32
    default_dir = "textvqa"
    options = {"file": Option(str, "TextVQA_0.5.1_val.json", "annotation file"),
               "images": Option(str, "train_images", "image directory (val images ship in train_images/)")}

    def load(self, data_root: str, default_num_frames: int) -> list[Sample]:
        d = self.directory(data_root)
        path = os.path.join(d, self.opts["file"])
        samples = []
        for row in _rows(read_json(path), path):
            where = f"{path}: question {row.get('question_id')}"
            require_keys(row, ("question_id", "question", "image_id", "answers"), where)
            samples.append(Sample(
                id=str(row["question_id"]),
                # lmms-eval capitalises the question (str.capitalize also lower-cases the rest)
                prompt=row["question"].capitalize() + SHORT_ANSWER,
                target={"answers": _answers(row, where)},
                images=(image_path(os.path.join(d, self.opts["images"]), f"{row['image_id']}.jpg", where),),
            ))
        return check_unique(samples, path)

    def score(self, prediction: str, target: dict) -> dict:
        return {"score": metrics.vqa_accuracy(prediction, target["answers"], task="textvqa"), "parsed": None}


class VQAv2(Task):
    name = "vqav2"
    description = ("VQAv2 (v2_OpenEnded_mscoco_<split>_questions.json + v2_mscoco_<split>_annotations.json), "
                   "VQA accuracy")
    metric = "VQA accuracy"
    max_new_tokens = 16
    default_dir = "vqav2"
    options = {"split": Option(str, "val2014", "COCO split name in the file names"),
               "images": Option(str, None, "image directory (default: the split name)")}

    def load(self, data_root: str, default_num_frames: int) -> list[Sample]:
        d, split = self.directory(data_root), self.opts["split"]
        qpath = os.path.join(d, f"v2_OpenEnded_mscoco_{split}_questions.json")
        apath = os.path.join(d, f"v2_mscoco_{split}_annotations.json")
        annotations = {a["question_id"]: a for a in _rows(read_json(apath), apath, "annotations")}
        images = os.path.join(d, self.opts["images"] or split)
        samples = []
        for q in _rows(read_json(qpath), qpath, "questions"):
            where = f"{qpath}: question {q.get('question_id')}"
            require_keys(q, ("question_id", "question", "image_id"), where)
            ann = annotations.get(q["question_id"])
            if ann is None:
                raise DataError(f"{where}: no annotation in {apath}")
            samples.append(Sample(
                id=str(q["question_id"]),
                prompt=q["question"] + SHORT_ANSWER,
                target={"answers": [str(a["answer"]) for a in ann["answers"]]},
                images=(image_path(images, f"COCO_{split}_{q['image_id']:012d}.jpg", where),),
            ))
        return check_unique(samples, qpath)

    def score(self, prediction: str, target: dict) -> dict:
        return {"score": metrics.vqa_accuracy(prediction, target["answers"], task="vqav2"), "parsed": None}


class _ANLSTask(Task):
    """DocVQA-style {"data": [...]} annotations; without file= the first of `files` found is read. Images
    are looked up in `image_dirs` (relative to the task directory) by the listed path, then by file name."""

    metric = "ANLS"
    image_field: str
    files: tuple[str, ...]
    image_dirs: tuple[str, ...]

    def load(self, data_root: str, default_num_frames: int) -> list[Sample]:
        d = self.directory(data_root)
        path = os.path.join(d, self.opts["file"] or first_existing(d, self.files, f"{self.name} annotation file"))
        dirs = [self.opts["images"]] if self.opts["images"] else [os.path.dirname(path), *self.image_dirs]
        dirs = [os.path.join(d, x) for x in dirs]
        samples = []
        for row in _rows(read_json(path), path):
            where = f"{path}: question {row.get('questionId')}"
            require_keys(row, ("questionId", "question", self.image_field, "answers"), where)
            name = row[self.image_field]
            found = next((p for x in dirs for p in (os.path.join(x, name), os.path.join(x, os.path.basename(name)))
                          if os.path.isfile(p)), None)
            if found is None:
                raise DataError(f"{where}: image {name} not found in {', '.join(dirs)} (set images=DIR)")
            samples.append(Sample(id=str(row["questionId"]), prompt=row["question"] + SHORT_ANSWER,
                                  target={"answers": _answers(row, where)}, images=(os.path.normpath(found),)))
        return check_unique(samples, path)

    def score(self, prediction: str, target: dict) -> dict:
        return {"score": metrics.anls(prediction, target["answers"], task=self.name), "parsed": None}


class DocVQA(_ANLSTask):
    name = "docvqa"
    description = "DocVQA val (spdocvqa_qas/val_v1.0_withQT.json or val/val_v1.0.json + the images it lists), ANLS"
    max_new_tokens = 32
    default_dir = "docvqa"
    image_field = "image"
    files = ("spdocvqa_qas/val_v1.0_withQT.json", "val_v1.0_withQT.json", "val/val_v1.0.json", "val_v1.0.json")
    image_dirs = ("spdocvqa_images", "val", ".")
    options = {"file": Option(str, None, "annotation file (default: the first of " + ", ".join(files) + ")"),
               "images": Option(str, None, "image directory (default: beside the annotation file, "
                                           + ", ".join(image_dirs) + ")")}


class InfoVQA(_ANLSTask):
    name = "infovqa"
    description = ("InfographicVQA val (infographicsvqa_qas/infographicsVQA_val_v1.0_withQT.json + "
                   "infographicsvqa_images/), ANLS")
    max_new_tokens = 32
    default_dir = "infovqa"
    image_field = "image_local_name"
    files = ("infographicsvqa_qas/infographicsVQA_val_v1.0_withQT.json", "infographicsVQA_val_v1.0_withQT.json",
             "infographicsVQA_val_v1.0.json")
    image_dirs = ("infographicsvqa_images",)
    options = {"file": Option(str, None, "annotation file (default: the first of " + ", ".join(files) + ")"),
               "images": Option(str, None, "image directory (default: infographicsvqa_images)")}


class ChartQA(Task):
    name = "chartqa"
    description = "ChartQA test (test/test_human.json + test/test_augmented.json + test/png/), relaxed accuracy"
    metric = "relaxed accuracy"
    summary_metrics = ("relaxed_human", "relaxed_augmented")
    max_new_tokens = 16
    default_dir = "chartqa"
    options = {"split": Option(str, "test", "split directory")}

    def load(self, data_root: str, default_num_frames: int) -> list[Sample]:
        d = os.path.join(self.directory(data_root), self.opts["split"])
        samples = []
        for kind in ("human", "augmented"):
            path = os.path.join(d, f"{self.opts['split']}_{kind}.json")
            rows = read_json(path)
            if not isinstance(rows, list):
                raise DataError(f"{path}: expected a JSON list of {{imgname, query, label}}")
            for i, row in enumerate(rows):
                where = f"{path}: entry {i}"
                require_keys(row, ("imgname", "query", "label"), where)
                samples.append(Sample(
                    id=f"{kind}/{i}",
                    prompt=row["query"] + SHORT_ANSWER,
                    target={"answer": str(row["label"]), "split": kind},
                    images=(image_path(os.path.join(d, "png"), row["imgname"], where),),
                ))
        return check_unique(samples, d)

    def score(self, prediction: str, target: dict) -> dict:
        return {"score": metrics.relaxed_accuracy(prediction, target["answer"], task="chartqa"), "parsed": None}

    def aggregate(self, rows: Sequence[dict]) -> dict:
        split = {k: percent(r["score"] for r in rows if r["target"]["split"] == k) for k in ("human", "augmented")}
        return {"score": percent(r["score"] for r in rows), "metrics": {"relaxed_human": split["human"],
                                                                         "relaxed_augmented": split["augmented"]}}


def _choice_score(task: str, prediction: str, target: dict) -> dict:
    parsed = metrics.extract_choice(prediction, target["options"], task=task)
    return {"score": float(parsed == target["answer"]), "parsed": parsed}


class AI2D(Task):
    name = "ai2d"
    description = "AI2D (questions/*.json + images/ + ai2d_test_ids.csv), multiple-choice accuracy"
    metric = "accuracy"
    max_new_tokens = 16
    default_dir = "ai2d"
    options = {"split": Option(str, "test", "'test' (images listed in ai2d_test_ids.csv) or 'all'")}

    def load(self, data_root: str, default_num_frames: int) -> list[Sample]:
        d = self.directory(data_root)
        keep = None
        if self.opts["split"] == "test":
            ids_path = require_file(os.path.join(d, "ai2d_test_ids.csv"), "AI2D test id list")
            with open(ids_path, encoding="utf-8") as f:
                keep = {line.strip() for line in f if line.strip()}
        elif self.opts["split"] != "all":
            raise ValueError(f"ai2d: split must be 'test' or 'all', got {self.opts['split']!r}")
        files = find_files(os.path.join(d, "questions"), "*.json", "AI2D question files")
        files.sort(key=lambda p: (len(os.path.basename(p)), os.path.basename(p)))  # 2.png.json before 10.png.json
        samples = []
        for path in files:
            doc = read_json(path)
            require_keys(doc, ("imageName", "questions"), path)
            if keep is not None and doc["imageName"].split(".")[0] not in keep:
                continue
            for question, q in doc["questions"].items():
                where = f"{path}: {question!r}"
                require_keys(q, ("answerTexts", "correctAnswer", "questionId"), where)
                options = [str(o) for o in q["answerTexts"]]
                samples.append(Sample(
                    id=str(q["questionId"]),
                    prompt=f"{question}\n{choices_block(options)}\n{LETTER_ANSWER}",
                    target={"options": options, "answer": metrics.option_letters(options)[int(q["correctAnswer"])]},
                    images=(image_path(os.path.join(d, "images"), doc["imageName"], where),),
                ))
        return check_unique(samples, d)

    def score(self, prediction: str, target: dict) -> dict:
        return _choice_score("ai2d", prediction, target)


class MMMU(Task):
    name = "mmmu"
    description = "MMMU (Hugging Face release: <subject>/<split>-*.parquet), accuracy (multiple choice + open)"
    metric = "accuracy"
    max_new_tokens = 16
    default_dir = "mmmu"
    options = {"split": Option(str, "validation", "split name in the Parquet file names")}
    _IMAGE_REF = re.compile(r"<image \d+>")

    def load(self, data_root: str, default_num_frames: int) -> list[Sample]:
        d = self.directory(data_root)
        files = [p for ext in ("parquet", "jsonl", "json")
                 for p in sorted(glob.glob(os.path.join(d, "**", f"{self.opts['split']}-*.{ext}"), recursive=True))]
        if not files:
            raise DataError(f"{d}: no MMMU files matching **/{self.opts['split']}-*.parquet (or .jsonl/.json)")
        samples = []
        for path in files:
            for row in read_table(path):
                where = f"{path}: {row.get('id')}"
                require_keys(row, ("id", "question", "options", "answer", "question_type"), where)
                options = row["options"]
                if isinstance(options, str):
                    options = ast.literal_eval(options)  # the HF release stores the list as its repr
                options = [str(o) for o in options]
                if row["question_type"] == "multiple-choice":
                    prompt = f"{row['question']}\n{choices_block(options)}\n\n{LETTER_ANSWER}"
                else:
                    prompt = f"{row['question']}\n\n{SHORT_ANSWER.strip()}"
                # The images the text refers to, as lmms-eval orders them: the sorted set of "<image N>".
                keys = sorted({ref.strip("<>").replace(" ", "_") for ref in self._IMAGE_REF.findall(
                    f"{row['question']}\n{choices_block(options)}")})
                samples.append(Sample(
                    id=str(row["id"]),
                    prompt=prompt,
                    target={"question_type": row["question_type"], "answer": row["answer"], "options": options},
                    images=tuple(self._image(row, key, path, where) for key in keys),
                ))
        return check_unique(samples, d)

    @staticmethod
    def _image(row: dict, key: str, path: str, where: str):
        value = row.get(key)
        if isinstance(value, dict) and value.get("bytes"):
            return bytes(value["bytes"])
        if isinstance(value, dict) and value.get("path"):
            value = value["path"]
        if isinstance(value, str):
            return image_path(os.path.dirname(path), value, where)
        raise DataError(f"{where}: the question refers to {key} but the row has no such image")

    def score(self, prediction: str, target: dict) -> dict:
        if target["question_type"] == "multiple-choice":
            parsed = metrics.extract_choice(prediction, target["options"], task="mmmu")
            gold = target["answer"]
            return {"score": float(parsed in gold if isinstance(gold, list) else parsed == gold), "parsed": parsed}
        return {"score": float(metrics.mmmu_open_correct(prediction, target["answer"])), "parsed": None}

    def aggregate(self, rows: Sequence[dict]) -> dict:
        by_subject: dict[str, list[float]] = defaultdict(list)
        for r in rows:
            m = re.match(r"^[^_]+_(.+?)_\d+$", r["id"])
            by_subject[m.group(1) if m else "unknown"].append(r["score"])
        return {"score": percent(r["score"] for r in rows),
                "metrics": {f"acc_{k}": percent(v) for k, v in sorted(by_subject.items())}}


MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork",
                  "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
_YES_NO_SUFFIX = " Please answer yes or no."
_IMAGE_EXTS = (".jpg", ".png", ".jpeg", ".JPG", ".PNG")


class MME(Task):
    name = "mme"
    description = "MME (MME_Benchmark_release_version/<category>/...), perception / cognition scores"
    metric = "perception score"
    summary_metrics = ("cognition", "total")
    max_new_tokens = 16
    default_dir = "mme"

    def load(self, data_root: str, default_num_frames: int) -> list[Sample]:
        d = self.directory(data_root)
        samples = []
        for category in MME_PERCEPTION + MME_COGNITION:
            cdir = os.path.join(d, category)
            if not os.path.isdir(cdir):
                continue
            qdir = os.path.join(cdir, "questions_answers_YN")
            idir = os.path.join(cdir, "images") if os.path.isdir(qdir) else cdir
            qdir = qdir if os.path.isdir(qdir) else cdir
            for txt in find_files(qdir, "*.txt", f"MME {category} question files"):
                stem = os.path.splitext(os.path.basename(txt))[0]
                image = next((os.path.join(idir, stem + e) for e in _IMAGE_EXTS
                              if os.path.isfile(os.path.join(idir, stem + e))), None)
                if image is None:
                    raise DataError(f"{txt}: no image {stem}.jpg/.png in {idir}")
                with open(txt, encoding="utf-8") as f:
                    lines = [line.rstrip("\n") for line in f if line.strip()]
                for i, line in enumerate(lines):
                    parts = line.split("\t")
                    if len(parts) < 2:
                        raise DataError(f"{txt}:{i + 1}: expected 'question<TAB>answer'")
                    question = parts[0].strip().replace(_YES_NO_SUFFIX, "")
                    pair = f"{category}/{os.path.basename(image)}"
                    samples.append(Sample(id=f"{pair}/{i}", prompt=question + SHORT_ANSWER,
                                          target={"answer": parts[1].strip(), "category": category, "pair": pair},
                                          images=(image,)))
        if not samples:
            raise DataError(f"{d}: no MME category directories ({', '.join(MME_PERCEPTION + MME_COGNITION)})")
        return check_unique(samples, d)

    def score(self, prediction: str, target: dict) -> dict:
        parsed = metrics.yes_no(prediction, task="mme")
        return {"score": float(parsed == target["answer"].lower().strip().replace(".", "")), "parsed": parsed}

    def aggregate(self, rows: Sequence[dict]) -> dict:
        """Per category: mean over images of acc (% of its 2 questions right) + acc+ (100 if both right)."""
        pairs: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        for r in rows:
            pairs[r["target"]["category"]][r["target"]["pair"]].append(r["score"])
        category = {}
        for cat, per_image in pairs.items():
            totals = [100.0 * sum(s) / len(s) + 100.0 * (len(s) == 2 and all(s)) for s in per_image.values()]
            category[cat] = sum(totals) / len(totals)
        perception = sum(v for k, v in category.items() if k in MME_PERCEPTION)
        cognition = sum(v for k, v in category.items() if k in MME_COGNITION)
        return {"score": perception, "metrics": {"perception": perception, "cognition": cognition,
                                                  "total": perception + cognition,
                                                  **{f"category_{k}": v for k, v in sorted(category.items())}}}


class POPE(Task):
    name = "pope"
    description = "POPE (coco_pope_{adversarial,popular,random}.json + COCO val2014 images), accuracy / F1"
    metric = "accuracy"
    summary_metrics = ("f1", "precision", "recall")
    max_new_tokens = 128
    default_dir = "pope"
    options = {"categories": Option(str, "adversarial+popular+random", "'+'-separated POPE splits"),
               "images": Option(str, "val2014", "COCO image directory")}

    def load(self, data_root: str, default_num_frames: int) -> list[Sample]:
        d = self.directory(data_root)
        samples = []
        for cat in self.opts["categories"].split("+"):
            # the POPE repository keeps them in output/coco/
            name = first_existing(d, (f"coco_pope_{cat}.json", f"output/coco/coco_pope_{cat}.json"),
                                  f"POPE {cat} file")
            path = os.path.join(d, name)
            for i, row in enumerate(read_jsonl(path, f"POPE {cat} file")):
                where = f"{path}: line {i + 1}"
                question = row.get("text", row.get("question"))
                answer = row.get("label", row.get("answer"))
                require_keys(row, ("question_id", "image"), where)
                if question is None or answer is None:
                    raise DataError(f"{where}: expected 'text' (or 'question') and 'label' (or 'answer')")
                samples.append(Sample(id=f"{cat}/{row['question_id']}", prompt=question.strip() + SHORT_ANSWER,
                                      target={"answer": answer.lower().strip(), "category": cat},
                                      images=(image_path(os.path.join(d, self.opts["images"]), row["image"], where),)))
        return check_unique(samples, d)

    def score(self, prediction: str, target: dict) -> dict:
        parsed = metrics.yes_no(prediction, task="pope")
        return {"score": float(parsed == target["answer"]), "parsed": parsed}

    def aggregate(self, rows: Sequence[dict]) -> dict:
        """lmms-eval's POPE aggregation: precision/recall over the exact 'yes'/'no' answers."""
        pairs = [(r["parsed"], r["target"]["answer"]) for r in rows]
        tp = sum(p == "yes" and g == "yes" for p, g in pairs)
        fp = sum(p == "yes" and g == "no" for p, g in pairs)
        fn = sum(p == "no" and g == "yes" for p, g in pairs)
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        by_cat = defaultdict(list)
        for r in rows:
            by_cat[r["target"]["category"]].append(r["score"])
        return {"score": percent(r["score"] for r in rows),
                "metrics": {"precision": 100 * precision, "recall": 100 * recall, "f1": 100 * f1,
                            "yes_ratio": percent(g == "yes" for _, g in pairs),
                            **{f"accuracy_{k}": percent(v) for k, v in sorted(by_cat.items())}}}


class GQA(Task):
    name = "gqa"
    description = "GQA testdev balanced (testdev_balanced_questions.json + images/), exact match"
    metric = "accuracy"
    max_new_tokens = 16
    default_dir = "gqa"
    files = ("testdev_balanced_questions.json", "questions1.2/testdev_balanced_questions.json")
    options = {"file": Option(str, None, "question file (default: the first of " + ", ".join(files) + ")"),
               "images": Option(str, "images", "image directory")}

    def load(self, data_root: str, default_num_frames: int) -> list[Sample]:
        d = self.directory(data_root)
        path = os.path.join(d, self.opts["file"] or first_existing(d, self.files, "GQA question file"))
        questions = read_json(path)
        if not isinstance(questions, dict):
            raise DataError(f"{path}: expected a JSON object {{question id: question}}")
        samples = []
        for qid, q in questions.items():
            where = f"{path}: question {qid}"
            require_keys(q, ("imageId", "question", "answer"), where)
            samples.append(Sample(id=str(qid), prompt=q["question"] + SHORT_ANSWER, target={"answer": q["answer"]},
                                  images=(image_path(os.path.join(d, self.opts["images"]), f"{q['imageId']}.jpg",
                                                     where),)))
        return check_unique(samples, path)

    def score(self, prediction: str, target: dict) -> dict:
        return {"score": metrics.exact_match(prediction, target["answer"]), "parsed": None}
