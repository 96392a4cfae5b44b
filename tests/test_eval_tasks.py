"""Task readers on synthetic files in each benchmark's published layout: the prompts NVILA is evaluated with,
the targets, the media, and clear errors for bad input."""

from __future__ import annotations

import json
import os

import PIL.Image
import pytest

from helpers.eval_data import write_benchmarks, write_mp4
from nvila_jax.eval.formats import DataError, read_srt, subtitles_at_frames, video_frame_count_and_fps
from nvila_jax.eval.tasks import TASKS, make_task, parse_spec, parse_task_list

SHORT = "\nAnswer the question using a single word or phrase."
LETTER = "Answer with the option's letter from the given choices directly."


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("benchmarks"))
    write_benchmarks(root)
    return root


def load(spec: str, root: str, frames: int = 8) -> dict:
    return {s.id: s for s in make_task(spec).load(root, frames)}


def test_every_task_reads_its_published_layout(data_root):
    specs = write_benchmarks(os.path.join(data_root, "again"))
    assert {parse_spec(s)[0] for s in specs} == set(TASKS)
    for spec in specs:
        samples = make_task(spec).load(os.path.join(data_root, "again"), 8)
        assert samples and len({s.id for s in samples}) == len(samples)
        for s in samples:
            assert all(os.path.isfile(im) for im in s.images if isinstance(im, str))
            assert s.video is None or os.path.exists(s.video)


def test_short_answer_prompts(data_root):
    tv = load("textvqa", data_root)
    # lmms-eval capitalises the TextVQA question (str.capitalize lower-cases the rest)
    assert tv["34603"].prompt == "What color is the sign?" + SHORT
    assert tv["34602"].target["answers"][-1] == "dakota" and len(tv["34602"].target["answers"]) == 10
    vq = load("vqav2", data_root)
    assert vq["42000"].prompt == "How many dogs are there?" + SHORT
    assert vq["42000"].images[0].endswith("val2014/COCO_val2014_000000000042.jpg")
    assert vq["42000"].target["answers"] == ["2"] * 6 + ["two"] * 3 + ["3"]
    doc = load("docvqa", data_root)
    assert doc["49153"].prompt == "What is the ‘actual’ value per 1000, during the year 1975?" + SHORT
    assert doc["49153"].images[0].endswith("docvqa/spdocvqa_images/pybv0228_81.png")
    chart = load("chartqa", data_root)
    assert set(chart) == {"human/0", "augmented/0", "augmented/1"}
    assert chart["augmented/1"].target == {"answer": "No", "split": "augmented"}
    mme = load("mme", data_root)
    # " Please answer yes or no." is replaced by the short-answer instruction
    assert mme["existence/000000006040.jpg/0"].prompt == "Is there a train in this image?" + SHORT
    assert mme["code_reasoning/0020.png/1"].target == {"answer": "No", "category": "code_reasoning",
                                                       "pair": "code_reasoning/0020.png"}
    pope = load("pope", data_root)
    assert set(pope) == {"adversarial/1", "popular/7", "random/1"}
    assert pope["popular/7"].prompt == "Is there a person in the image?" + SHORT  # question stripped
    assert set(load("pope[categories=random]", data_root)) == {"random/1"}


def test_multiple_choice_prompts(data_root):
    ai2d = load("ai2d", data_root)
    assert set(ai2d) == {"4.png-0", "10.png-0", "10.png-1"}  # image 2 is not in the test id list
    assert ai2d["10.png-1"].prompt == f"What eats grass?\nA. lion\nB. cow\nC. hawk\nD. snake\n{LETTER}"
    assert ai2d["10.png-1"].target["answer"] == "B"
    assert len(load("ai2d[split=all]", data_root)) == 4
    mmmu = load("mmmu", data_root)
    assert mmmu["validation_Art_1"].prompt == (
        f"<image 1> Which color dominates? Compare with <image 2>.\nA. Red\nB. Green\nC. Blue\nD. Yellow\n\n{LETTER}")
    assert mmmu["validation_Art_2"].prompt == ("How many sides does the shape in <image 1> have?\n\n"
                                               "Answer the question using a single word or phrase.")
    # images are the ones the text refers to (options included), decoded from the Parquet bytes
    assert [len(s.images) for s in mmmu.values()] == [2, 1, 2]
    assert all(isinstance(im, bytes) for s in mmmu.values() for im in s.images)


def test_video_prompts_and_frames(data_root):
    vm = load("videomme", data_root, frames=16)
    instruction = ("Select the best answer to the following multiple-choice question based on the video. Respond "
                   "with only the letter (A, B, C, or D) of the correct option.\n")
    assert vm["001-1"].prompt == (instruction + "How many people appear?\nA. 1.\nB. 2.\nC. 3.\nD. 4.\n"
                                  "The best answer is:")
    assert vm["001-1"].num_frames == 16 and vm["601-1"].video.endswith("LongVid01.mp4")
    assert set(load("videomme[duration=long,frames=4]", data_root)) == {"601-1"}
    subs = load("videomme_w_subtitle[frames=4]", data_root)
    # 12 frames at 1 fps; frames 0, 4, 7, 11 fall in subtitles 0-2 s, 2-5 s and 9-20 s (frame 7 in none)
    assert subs["001-1"].prompt == (
        "This video's subtitles are listed below:\nhello there\ngeneral kenobi\nthe end\n"
        "Select the best answer to the following multiple-choice question based on the video and the subtitles. "
        "Respond with only the letter (A, B, C, or D) of the correct option.\n"
        "How many people appear?\nA. 1.\nB. 2.\nC. 3.\nD. 4.\nThe best answer is:")
    assert subs["601-1"].prompt == vm["601-1"].prompt  # no subtitle file: the plain prompt
    ego = load("egoschema[frames=4]", data_root)
    assert set(ego) == {"0074f737-11cb-497d-8d07-77c3a8127391", "00b9a0de-c59e-49cb-a127-6081e2fb8c8e"}
    assert ego["00b9a0de-c59e-49cb-a127-6081e2fb8c8e"].prompt == (
        "Watching the video and answer with the option's letter from the given choices directly.Summarize the "
        "video.\nA. summary 0\nB. summary 1\nC. summary 2\nD. summary 3\nE. summary 4\n")
    assert ego["0074f737-11cb-497d-8d07-77c3a8127391"].target["answer"] == "D"


def test_subtitle_selection_at_frames(tmp_path, data_root):
    srt = os.path.join(data_root, "videomme", "subtitle", "fFjv93ACGo8.srt")
    assert read_srt(srt)[(2.0, 5.0)] == '<font color="white" size=".72c">general kenobi</font>'
    # 30 frames at 10 fps, 2 frames: 0 and 29 -> frame 0 in 0-20 frames ("hello there"), 29 in 20-50
    assert subtitles_at_frames(srt, 30, 10.0, 2) == "hello there\ngeneral kenobi"
    write_mp4(str(tmp_path / "v.mp4"), frames=25, fps=10)
    assert video_frame_count_and_fps(str(tmp_path / "v.mp4"), 1.0) == (25, 10.0)
    assert video_frame_count_and_fps(os.path.join(data_root, "videomme", "data", "fFjv93ACGo8"), 2.5) == (12, 2.5)


def test_generic_jsonl(data_root):
    g = load("jsonl[file=custom/questions.jsonl]", data_root)
    assert g["q1"].prompt == "What color is the square?" + SHORT and g["q1"].target["metric"] == "exact"
    assert g["q2"].prompt == f"Which picture is blue?\nA. the first\nB. the second\n{LETTER}"
    assert g["q2"].target["answer"] == "B" and len(g["q2"].images) == 2  # answer given as an index
    assert g["q3"].video.endswith("clips/c1") and g["q3"].num_frames == 8
    custom = load(r"jsonl[file=custom/questions.jsonl,post_prompt=\nBe brief.,frames=2]", data_root)
    assert custom["q1"].prompt == "What color is the square?\nBe brief." and custom["q3"].num_frames == 2
    assert make_task("jsonl[file=custom/questions.jsonl,metric=anls]").metric == "ANLS"


def test_task_specs():
    assert parse_task_list("textvqa, videomme[frames=64,duration=short] ,jsonl[file=a.jsonl]") == [
        "textvqa", "videomme[frames=64,duration=short]", "jsonl[file=a.jsonl]"]
    task = make_task("videomme[frames=64]")
    assert task.opts["frames"] == 64 and task.key == "videomme@frames=64" and task.spec == "videomme[frames=64]"
    assert make_task(task.spec).settings(8) == task.settings(8)
    assert make_task("egoschema").settings(32)["frames"] == 32
    assert make_task("docvqa[max_new_tokens=64]").generation_length == 64
    for bad, message in (("nosuch", "unknown task 'nosuch'"), ("videomme[frame=3]", "unknown option"),
                         ("videomme[frames=x]", "not a valid int"), ("videomme[frames]", "not key=value"),
                         ("jsonl", "needs a file"), ("a,b[", "unbalanced")):
        with pytest.raises(ValueError, match=message):
            [make_task(s) for s in parse_task_list(bad)]


def test_bad_input_names_the_file(tmp_path, data_root):
    with pytest.raises(DataError, match="data directory .*textvqa not found"):
        make_task("textvqa").load(str(tmp_path), 8)
    (tmp_path / "gqa").mkdir()
    (tmp_path / "gqa" / "testdev_balanced_questions.json").write_text(json.dumps({"1": {"question": "q?"}}))
    with pytest.raises(DataError, match=r"testdev_balanced_questions.json: question 1: missing field\(s\) imageId, "
                                        "answer"):
        make_task("gqa").load(str(tmp_path), 8)
    (tmp_path / "gqa" / "testdev_balanced_questions.json").write_text(json.dumps(
        {"1": {"question": "q?", "imageId": "nope", "answer": "a"}}))
    with pytest.raises(DataError, match=r"image .*gqa/images/nope.jpg not found"):
        make_task("gqa").load(str(tmp_path), 8)
    (tmp_path / "custom.jsonl").write_text('{"id": 1, "question": "a?", "answer": "x"}\n{"id": 1, "question": "b?", '
                                           '"answer": "y"}\n')
    with pytest.raises(DataError, match="duplicate sample id '1'"):
        make_task("jsonl[file=custom.jsonl]").load(str(tmp_path), 8)
    (tmp_path / "custom.jsonl").write_text('{"question": "a?", "options": ["x", "y"], "answer": "z"}\n')
    with pytest.raises(DataError, match=r"custom.jsonl:1: answer 'z' is not an option letter \(AB\)"):
        make_task("jsonl[file=custom.jsonl]").load(str(tmp_path), 8)
    (tmp_path / "custom.jsonl").write_text('{"question": "a?", "answer": "x"}\n{broken\n')
    with pytest.raises(DataError, match="custom.jsonl:2: not valid JSON"):
        make_task("jsonl[file=custom.jsonl]").load(str(tmp_path), 8)


def test_eval_suites_load_and_name_valid_tasks(tmp_path):
    from nvila_jax.eval.suite import load_suite

    root = os.path.join(os.path.dirname(__file__), "..", "configs", "eval")
    for name in sorted(os.listdir(root)):
        if name.endswith(".py"):
            suite = load_suite(os.path.join(root, name))
            assert [make_task(spec) for spec in parse_task_list(suite.tasks)]
    video = load_suite(os.path.join(root, "video.py"), ["--config.limit=5", "--config.tasks=egoschema[frames=16]"])
    assert video.limit == 5 and video.tasks == "egoschema[frames=16]"
    with pytest.raises(ValueError, match="unknown key"):
        load_suite(os.path.join(root, "video.py"), ["--config.frames=5"])
    (tmp_path / "bad.py").write_text("import ml_collections\n\ndef get_config():\n"
                                     "    return ml_collections.ConfigDict({'tasks': 'gqa', 'batchsize': 2})\n")
    with pytest.raises(ValueError, match="unknown field.*batchsize"):
        load_suite(str(tmp_path / "bad.py"))


def test_docvqa_older_release_layout(tmp_path):
    """val.tar.gz of the first DocVQA release: val/val_v1.0.json with images under val/documents/."""
    (tmp_path / "docvqa" / "val" / "documents").mkdir(parents=True)
    PIL.Image.new("RGB", (8, 8)).save(tmp_path / "docvqa" / "val" / "documents" / "a.png")
    (tmp_path / "docvqa" / "val" / "val_v1.0.json").write_text(json.dumps({"data": [
        {"questionId": 7, "question": "Date?", "image": "documents/a.png", "answers": ["1999"]}]}))
    (sample,) = make_task("docvqa").load(str(tmp_path), 8)
    assert sample.images == (str(tmp_path / "docvqa" / "val" / "documents" / "a.png"),)
    (tmp_path / "docvqa" / "val" / "documents" / "a.png").unlink()
    with pytest.raises(DataError, match="image documents/a.png not found in .*set images=DIR"):
        make_task("docvqa").load(str(tmp_path), 8)
    with pytest.raises(DataError, match="no infovqa annotation file .looked for infographicsvqa_qas/"):
        (tmp_path / "infovqa").mkdir()
        make_task("infovqa").load(str(tmp_path), 8)


def test_repository_layouts_of_gqa_and_pope(tmp_path):
    (tmp_path / "gqa" / "questions1.2").mkdir(parents=True)
    (tmp_path / "gqa" / "images").mkdir()
    PIL.Image.new("RGB", (8, 8)).save(tmp_path / "gqa" / "images" / "n1.jpg")
    (tmp_path / "gqa" / "questions1.2" / "testdev_balanced_questions.json").write_text(json.dumps(
        {"5": {"imageId": "n1", "question": "Is it red?", "answer": "no"}}))
    assert [s.id for s in make_task("gqa").load(str(tmp_path), 8)] == ["5"]
    (tmp_path / "pope" / "output" / "coco").mkdir(parents=True)
    (tmp_path / "pope" / "val2014").mkdir()
    PIL.Image.new("RGB", (8, 8)).save(tmp_path / "pope" / "val2014" / "x.jpg")
    (tmp_path / "pope" / "output" / "coco" / "coco_pope_random.json").write_text(
        json.dumps({"question_id": 3, "image": "x.jpg", "text": "Is there a cat?", "label": "no"}) + "\n")
    assert [s.id for s in make_task("pope[categories=random]").load(str(tmp_path), 8)] == ["random/3"]
    with pytest.raises(DataError, match="no POPE adversarial file .looked for coco_pope_adversarial.json, output/coco/"):
        make_task("pope").load(str(tmp_path), 8)
