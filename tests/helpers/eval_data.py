"""Tiny synthetic benchmark files in each benchmark's published layout, for the eval tests.

`write_benchmarks(root)` writes every supported format under `root` (a few questions each, small images,
videos as frame directories and one .mp4) and returns the task specs to run on them.
"""

from __future__ import annotations

import io
import json
import os

import numpy as np
import PIL.Image

COLORS = ("red", "green", "blue", "yellow", "purple", "white")


def _image(path: str, color: str, size=(24, 20)) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    PIL.Image.new("RGB", size, color).save(path)
    return path


def _json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f)


def _jsonl(path: str, rows) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def _frames(directory: str, n: int, color: str) -> None:
    for i in range(n):
        _image(os.path.join(directory, f"{i:04d}.png"), color, size=(20 + i % 3, 16))


def write_mp4(path: str, frames: int, fps: int) -> None:
    import av

    os.makedirs(os.path.dirname(path), exist_ok=True)
    with av.open(path, "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), (i * 9) % 256, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _png_bytes(color: str) -> bytes:
    buf = io.BytesIO()
    PIL.Image.new("RGB", (18, 14), color).save(buf, format="PNG")
    return buf.getvalue()


SRT = """1
00:00:00,000 --> 00:00:02,000
<font color="white" size=".72c">hello there</font>

2
00:00:02,000 --> 00:00:05,000
<font color="white" size=".72c">general kenobi</font>

3
00:00:09,000 --> 00:00:20,000
<font color="white" size=".72c">the end</font>
"""


def write_benchmarks(root: str) -> list[str]:
    r = lambda *p: os.path.join(root, *p)  # noqa: E731

    # TextVQA: annotation JSON with "data", val images in train_images/<image_id>.jpg
    _json(r("textvqa", "TextVQA_0.5.1_val.json"), {"dataset_name": "textvqa", "data": [
        {"question_id": 34602, "question": "what is the brand of this camera?", "image_id": "003a8ae2ef43b901",
         "answers": ["nous les gosses"] * 4 + ["dakota"] * 3 + ["clos culombu", "dakota digital", "dakota"]},
        {"question_id": 34603, "question": "What COLOR is the sign?", "image_id": "00685bc495504d61",
         "answers": ["red"] * 10},
    ]})
    _image(r("textvqa", "train_images", "003a8ae2ef43b901.jpg"), "red")
    _image(r("textvqa", "train_images", "00685bc495504d61.jpg"), "green")

    # VQAv2: questions + annotations, COCO_val2014_<12 digits>.jpg
    _json(r("vqav2", "v2_OpenEnded_mscoco_val2014_questions.json"), {"questions": [
        {"image_id": 42, "question": "How many dogs are there?", "question_id": 42000},
        {"image_id": 73, "question": "Is the man's shirt red?", "question_id": 73001}]})
    _json(r("vqav2", "v2_mscoco_val2014_annotations.json"), {"annotations": [
        {"question_id": 42000, "image_id": 42, "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                                                           for i, a in enumerate(["2"] * 6 + ["two"] * 3 + ["3"])]},
        {"question_id": 73001, "image_id": 73, "answers": [{"answer": "yes", "answer_confidence": "yes",
                                                            "answer_id": i + 1} for i in range(10)]}]})
    _image(r("vqav2", "val2014", "COCO_val2014_000000000042.jpg"), "blue")
    _image(r("vqav2", "val2014", "COCO_val2014_000000000073.jpg"), "white")

    # DocVQA / InfoVQA: {"data": [...]} with questionId and answers (the current releases' *_qas/ and *_images/
    # folders; DocVQA's "image" field keeps the old "documents/" prefix)
    _json(r("docvqa", "spdocvqa_qas", "val_v1.0_withQT.json"), {"dataset_split": "val", "data": [
        {"questionId": 49153, "question": "What is the ‘actual’ value per 1000, during the year 1975?",
         "image": "documents/pybv0228_81.png", "docId": 14465, "answers": ["0.28"]},
        {"questionId": 24580, "question": "What is the name of the company?", "image": "documents/xnbl0037_1.png",
         "docId": 1, "answers": ["ITC Limited", "itc limited"]}]})
    _image(r("docvqa", "spdocvqa_images", "pybv0228_81.png"), "white")
    _image(r("docvqa", "spdocvqa_images", "xnbl0037_1.png"), "yellow")
    _json(r("infovqa", "infographicsvqa_qas", "infographicsVQA_val_v1.0_withQT.json"), {"data": [
        {"questionId": 65718, "question": "Which country has the most cases?", "image_local_name": "38118.jpeg",
         "answers": ["USA", "united states"]},
        {"questionId": 65719, "question": "What percentage use email?", "image_local_name": "38119.jpeg",
         "answers": ["45%"]}]})
    _image(r("infovqa", "infographicsvqa_images", "38118.jpeg"), "purple")
    _image(r("infovqa", "infographicsvqa_images", "38119.jpeg"), "blue")

    # ChartQA: test/test_{human,augmented}.json lists + test/png/
    _json(r("chartqa", "test", "test_human.json"), [{"imgname": "41699051005347.png",
                                                     "query": "What's the value of the lowest bar?", "label": "23"}])
    _json(r("chartqa", "test", "test_augmented.json"), [{"imgname": "two_col_40.png",
                                                         "query": "Which year has the highest value?",
                                                         "label": "2014"},
                                                        {"imgname": "two_col_40.png", "query": "Is it a pie chart?",
                                                         "label": "No"}])
    _image(r("chartqa", "test", "png", "41699051005347.png"), "green")
    _image(r("chartqa", "test", "png", "two_col_40.png"), "red")

    # AI2D: questions/<image>.json, images/, ai2d_test_ids.csv (image 2 is train: excluded)
    for image_id, color in ((10, "blue"), (2, "green"), (4, "red")):
        _image(r("ai2d", "images", f"{image_id}.png"), color)
    _json(r("ai2d", "questions", "10.png.json"), {"imageName": "10.png", "questions": {
        "Which label shows the sun?": {"abcLabel": True, "answerTexts": ["A", "B", "C", "D"], "correctAnswer": 2,
                                       "questionId": "10.png-0"},
        "What eats grass?": {"abcLabel": False, "answerTexts": ["lion", "cow", "hawk", "snake"], "correctAnswer": 1,
                             "questionId": "10.png-1"}}})
    _json(r("ai2d", "questions", "2.png.json"), {"imageName": "2.png", "questions": {
        "Train question?": {"abcLabel": False, "answerTexts": ["x", "y"], "correctAnswer": 0,
                            "questionId": "2.png-0"}}})
    _json(r("ai2d", "questions", "4.png.json"), {"imageName": "4.png", "questions": {
        "What is the outer layer?": {"abcLabel": False, "answerTexts": ["crust", "mantle", "core"], "correctAnswer": 0,
                                     "questionId": "4.png-0"}}})
    with open(r("ai2d", "ai2d_test_ids.csv"), "w") as f:
        f.write("4\n10\n")

    # MMMU: Hugging Face Parquet, options as a repr string, images as {"bytes", "path"} structs
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(r("mmmu", "Art"), exist_ok=True)
    rows = [
        {"id": "validation_Art_1", "question": "<image 1> Which color dominates? Compare with <image 2>.",
         "options": "['Red', 'Green', 'Blue', 'Yellow']", "answer": "A", "question_type": "multiple-choice",
         "image_1": {"bytes": _png_bytes("red"), "path": "a.png"}, "image_2": {"bytes": _png_bytes("green"),
                                                                              "path": "b.png"}},
        {"id": "validation_Art_2", "question": "How many sides does the shape in <image 1> have?", "options": "[]",
         "answer": "4", "question_type": "open", "image_1": {"bytes": _png_bytes("blue"), "path": "c.png"},
         "image_2": None},
        {"id": "validation_Art_3", "question": "Which option is shown?",
         "options": "['<image 1>', '<image 2>']", "answer": "B", "question_type": "multiple-choice",
         "image_1": {"bytes": _png_bytes("yellow"), "path": "d.png"},
         "image_2": {"bytes": _png_bytes("white"), "path": "e.png"}},
    ]
    pq.write_table(pa.Table.from_pylist(rows), r("mmmu", "Art", "validation-00000-of-00001.parquet"))

    # MME: one category with images/ + questions_answers_YN/, one with both in the category directory
    _image(r("mme", "existence", "images", "000000006040.jpg"), "red")
    os.makedirs(r("mme", "existence", "questions_answers_YN"), exist_ok=True)
    with open(r("mme", "existence", "questions_answers_YN", "000000006040.txt"), "w") as f:
        f.write("Is there a train in this image? Please answer yes or no.\tYes\n"
                "Is there a bed in this image? Please answer yes or no.\tNo\n")
    _image(r("mme", "code_reasoning", "0020.png"), "white")
    with open(r("mme", "code_reasoning", "0020.txt"), "w") as f:
        f.write("Is the output of the code '5'? Please answer yes or no.\tYes\n"
                "Is the output of the code '6'? Please answer yes or no.\tNo\n")

    # POPE: JSON lines per category + COCO images
    for cat, thing, label in (("random", "skateboard", "yes"), ("adversarial", "snowboard", "no")):
        _jsonl(r("pope", f"coco_pope_{cat}.json"), [{"question_id": 1, "image": "COCO_val2014_000000310196.jpg",
                                                     "text": f"Is there a {thing} in the image?", "label": label}])
    _jsonl(r("pope", "coco_pope_popular.json"), [{"question_id": 7, "image": "COCO_val2014_000000310196.jpg",
                                                  "text": "Is there a person in the image? ", "label": "yes"}])
    _image(r("pope", "val2014", "COCO_val2014_000000310196.jpg"), "yellow")

    # GQA: {question id: question}
    _json(r("gqa", "testdev_balanced_questions.json"), {
        "201307251": {"imageId": "n161313", "question": "Is it overcast?", "answer": "no", "fullAnswer": "No."},
        "201640614": {"imageId": "n235859", "question": "Who is wearing a dress?", "answer": "woman"}})
    _image(r("gqa", "images", "n161313.jpg"), "blue")
    _image(r("gqa", "images", "n235859.jpg"), "purple")

    # Video-MME: the Parquet table, videos as data/<videoID>.mp4 or a frame directory, subtitle/<videoID>.srt
    pq.write_table(pa.Table.from_pylist([
        {"video_id": "001", "duration": "short", "domain": "Knowledge", "sub_category": "Humanity & History",
         "url": "https://www.youtube.com/watch?v=fFjv93ACGo8", "videoID": "fFjv93ACGo8", "question_id": "001-1",
         "task_type": "Counting Problem", "question": "How many people appear?",
         "options": ["A. 1.", "B. 2.", "C. 3.", "D. 4."], "answer": "C"},
        {"video_id": "001", "duration": "short", "domain": "Knowledge", "sub_category": "Humanity & History",
         "url": "https://www.youtube.com/watch?v=fFjv93ACGo8", "videoID": "fFjv93ACGo8", "question_id": "001-2",
         "task_type": "Object Recognition", "question": "What is shown first?",
         "options": ["A. A cat.", "B. A dog.", "C. A car.", "D. A tree."], "answer": "A"},
        {"video_id": "601", "duration": "long", "domain": "Sports Competition", "sub_category": "Football",
         "url": "https://www.youtube.com/watch?v=xyz", "videoID": "LongVid01", "question_id": "601-1",
         "task_type": "Action Reasoning", "question": "Why does the crowd cheer?",
         "options": ["A. A goal.", "B. A foul.", "C. Half time.", "D. Rain."], "answer": "A"},
    ]), _mkparent(r("videomme", "videomme", "test-00000-of-00001.parquet")))
    _frames(r("videomme", "data", "fFjv93ACGo8"), 12, "red")  # 12 frames at 1 fps (frame_dir_fps)
    write_mp4(r("videomme", "data", "LongVid01.mp4"), frames=30, fps=10)
    os.makedirs(r("videomme", "subtitle"), exist_ok=True)
    with open(r("videomme", "subtitle", "fFjv93ACGo8.srt"), "w") as f:
        f.write(SRT)

    # EgoSchema: questions.json (all), subset_answers.json (validation subset), videos/<q_uid>
    _json(r("egoschema", "questions.json"), [
        {"q_uid": "0074f737-11cb-497d-8d07-77c3a8127391", "google_drive_id": "1", "question": "What is c doing?",
         **{f"option {i}": f"option text {i}" for i in range(5)}},
        {"q_uid": "00b9a0de-c59e-49cb-a127-6081e2fb8c8e", "google_drive_id": "2", "question": "Summarize the video.",
         **{f"option {i}": f"summary {i}" for i in range(5)}},
        {"q_uid": "test-only-question", "google_drive_id": "3", "question": "Hidden?",
         **{f"option {i}": f"h {i}" for i in range(5)}}])
    _json(r("egoschema", "subset_answers.json"), {"0074f737-11cb-497d-8d07-77c3a8127391": 3,
                                                   "00b9a0de-c59e-49cb-a127-6081e2fb8c8e": 0})
    _frames(r("egoschema", "videos", "0074f737-11cb-497d-8d07-77c3a8127391"), 9, "green")
    _frames(r("egoschema", "videos", "00b9a0de-c59e-49cb-a127-6081e2fb8c8e"), 5, "blue")

    # The generic JSON-lines task: short answers, options, several images, a video
    _image(r("custom", "imgs", "1.png"), "red")
    _image(r("custom", "imgs", "2.png"), "blue")
    _frames(r("custom", "clips", "c1"), 6, "yellow")
    _jsonl(r("custom", "questions.jsonl"), [
        {"id": "q1", "question": "What color is the square?", "image": "imgs/1.png", "answer": "red"},
        {"id": "q3", "question": "What color are the frames?", "video": "clips/c1", "answers": ["yellow", "gold"]},
        {"id": "q2", "question": "Which picture is blue?", "images": ["imgs/1.png", "imgs/2.png"],
         "options": ["the first", "the second"], "answer": 1},
    ])

    return ["textvqa", "vqav2", "docvqa", "infovqa", "chartqa", "ai2d", "mmmu", "mme", "pope", "gqa",
            "videomme[frames=4]", "videomme_w_subtitle[frames=4]", "egoschema[frames=4]",
            "jsonl[file=custom/questions.jsonl,frames=4]"]


def _mkparent(path: str) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return path
