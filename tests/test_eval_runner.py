"""The eval runner on synthetic benchmark files with scripted answers: official scores worked out by hand,
results equal to recomputing the metrics from predictions.jsonl, resumption after a failure or a kill
without re-generating finished samples, `--rescore`, and the command line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict

import pytest

from helpers.eval_data import write_benchmarks
from nvila_jax.cli import main as cli_main
from nvila_jax.eval import evaluate, make_task, metrics, rescore
from nvila_jax.eval.formats import DataError
from nvila_jax.eval.runner import RunMismatchError

# sample id -> (scripted answer, expected per-sample score), scores worked out by hand from the definitions
SCRIPT = {
    "textvqa": {"34602": ("Dakota Digital", 0.3),  # 1 of 10 answers matches: 9 subsets at 1/3, one at 0
                "34603": ("Red.", 1.0)},
    "vqav2": {"42000": ("two", 1.0),  # references disagree -> normalised: 9 of them are "2"
              "73001": ("no", 0.0)},
    "docvqa": {"49153": ("0.28", 1.0),
               "24580": ("ITC Ltd", 7 / 11)},  # "itc ltd" -> "itc limited": 4 edits / len("ITC Limited") = 11
    "infovqa": {"65718": ("United States", 1.0), "65719": ("45", 2 / 3)},  # 1 edit / len("45%")
    "chartqa": {"human/0": ("25", 0.0),  # 8.7% off 23
                "augmented/0": ("2100", 1.0),  # 4.3% off 2014
                "augmented/1": ("no", 1.0)},  # case-insensitive
    "ai2d": {"4.png-0": ("A", 1.0), "10.png-0": ("c", 1.0), "10.png-1": ("The answer is B", 0.0)},
    "mmmu": {"validation_Art_1": ("(A) Red", 1.0), "validation_Art_2": ("The shape has 4 sides", 1.0),
             "validation_Art_3": ("A", 0.0)},
    "mme": {"existence/000000006040.jpg/0": ("Yes", 1.0), "existence/000000006040.jpg/1": ("No", 1.0),
            "code_reasoning/0020.png/0": ("yes", 1.0), "code_reasoning/0020.png/1": ("Yes", 0.0)},
    "pope": {"adversarial/1": ("No", 1.0), "popular/7": ("Yes.", 0.0), "random/1": ("yes", 1.0)},
    "gqa": {"201307251": ("No.", 1.0), "201640614": ("A woman", 0.0)},
    "videomme": {"001-1": ("C", 1.0), "001-2": ("The best answer is A.", 1.0),
                 "601-1": ("Because of a goal", 0.0)},  # the first capital A-D is the "B" of "Because"
    "egoschema": {"0074f737-11cb-497d-8d07-77c3a8127391": ("D.", 1.0),
                  "00b9a0de-c59e-49cb-a127-6081e2fb8c8e": ("I think it is B", 0.0)},
    "jsonl": {"q1": ("Red", 1.0), "q2": ("B", 1.0), "q3": ("gold.", 1.0)},
}
SCRIPT["videomme_w_subtitle"] = SCRIPT["videomme"]
# task spec -> (results directory, primary score, {metric: value}), by hand from SCRIPT
EXPECTED = {
    "textvqa": ("textvqa", 65.0, {}),
    "vqav2": ("vqav2", 50.0, {}),
    "docvqa": ("docvqa", 100 * (1 + 7 / 11) / 2, {}),
    "infovqa": ("infovqa", 100 * (1 + 2 / 3) / 2, {}),
    "chartqa": ("chartqa", 200 / 3, {"relaxed_human": 0.0, "relaxed_augmented": 100.0}),
    "ai2d": ("ai2d", 200 / 3, {}),
    "mmmu": ("mmmu", 200 / 3, {"acc_Art": 200 / 3}),
    # existence: both right -> 100 + 100; code_reasoning: one right -> 50 + 0
    "mme": ("mme", 200.0, {"perception": 200.0, "cognition": 50.0, "total": 250.0}),
    # tp 1, fp 0, fn 0 ("Yes." is neither yes nor no for POPE)
    "pope": ("pope", 200 / 3, {"precision": 100.0, "recall": 100.0, "f1": 100.0, "yes_ratio": 200 / 3}),
    "gqa": ("gqa", 50.0, {}),
    "videomme[frames=4]": ("videomme@frames=4", 200 / 3, {"accuracy_short": 100.0, "accuracy_long": 0.0}),
    "videomme_w_subtitle[frames=4]": ("videomme_w_subtitle@frames=4", 200 / 3, {}),
    "egoschema[frames=4]": ("egoschema@frames=4", 50.0, {}),
    "jsonl[file=custom/questions.jsonl,frames=4]": ("jsonl-questions@frames=4", 100.0, {}),
}


class Scripted:
    """A generate_batch callable answering from SCRIPT (by prompt); counts calls and prompts; can fail."""

    def __init__(self, data_root: str, fail_on_call: int | None = None):
        self.answers = {}
        for spec in EXPECTED:
            task = make_task(spec)
            for s in task.load(data_root, 8):
                self.answers[s.prompt] = SCRIPT[task.name][s.id][0]
        self.calls, self.prompts, self.fail_on_call = 0, [], fail_on_call

    def __call__(self, requests):
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise RuntimeError("injected failure")
        self.prompts += [r.prompt for r in requests]
        return [self.answers[r.prompt] for r in requests]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("benchmarks"))
    write_benchmarks(root)
    return root


def run(data_root, out, generator, specs=tuple(EXPECTED), **kw):
    return evaluate(generator, [make_task(s) for s in specs], data_root=data_root, out=str(out),
                    model_info={"name": "scripted"}, progress=False, **kw)


def recompute(task_dir: str) -> float:
    """The primary score straight from predictions.jsonl with the metric functions (not the task classes)."""
    with open(os.path.join(task_dir, "run.json")) as f:
        name = make_task(json.load(f)["task"]).name
    with open(os.path.join(task_dir, "predictions.jsonl")) as f:
        records = [json.loads(line) for line in f]
    scores, pairs = [], defaultdict(lambda: defaultdict(list))
    for r in records:
        p, t = r["prediction"], r["target"]
        if name in ("textvqa", "vqav2"):
            s = metrics.vqa_accuracy(p, t["answers"], task=name)
        elif name in ("docvqa", "infovqa"):
            s = metrics.anls(p, t["answers"])
        elif name == "chartqa":
            s = metrics.relaxed_accuracy(p, t["answer"])
        elif name == "gqa":
            s = metrics.exact_match(p, t["answer"])
        elif name == "pope":
            s = float(metrics.yes_no(p, task="pope") == t["answer"])
        elif name == "mme":
            s = float(metrics.yes_no(p, task="mme") == t["answer"].lower())
            pairs[t["category"]][t["pair"]].append(s)
        elif name == "mmmu" and t["question_type"] == "open":
            s = float(metrics.mmmu_open_correct(p, t["answer"]))
        elif name == "jsonl" and t["metric"] == "exact":
            s = float(metrics.normalize_vqa_answer(p) in {metrics.normalize_vqa_answer(a) for a in t["answers"]})
        else:  # letter answers
            rule = {"videomme_w_subtitle": "videomme", "jsonl": None}.get(name, name)
            s = float(metrics.extract_choice(p, t["options"], task=rule) == t["answer"])
        scores.append(s)
    if name == "mme":
        return sum(sum(100 * sum(v) / 2 + 100 * all(v) for v in imgs.values()) / len(imgs)
                   for cat, imgs in pairs.items() if cat == "existence")
    return 100 * sum(scores) / len(scores)


def read_results(out, key):
    with open(os.path.join(out, key, "results.json")) as f:
        return json.load(f)


def test_official_scores_on_every_format(data_root, tmp_path):
    generator = Scripted(data_root)
    results = run(data_root, tmp_path, generator, batch_size=2)
    assert set(results) == {key for key, _, _ in EXPECTED.values()}
    for spec, (key, score, extra) in EXPECTED.items():
        r = results[key]
        assert r == read_results(tmp_path, key)
        assert r["score"] == pytest.approx(score), spec
        for name, value in extra.items():
            assert r["metrics"][name] == pytest.approx(value), (spec, name)
        assert r["complete"] and r["counts"]["missing"] == 0 and r["counts"]["predicted"] == r["counts"]["samples"]
        assert r["score"] == pytest.approx(recompute(os.path.join(tmp_path, key)))
        assert r["model"]["name"] == "scripted" and r["settings"] == make_task(spec).settings(8)
        with open(os.path.join(tmp_path, key, "samples.jsonl")) as f:
            per_sample = {json.loads(line)["id"]: json.loads(line)["score"] for line in f}
        task_name = make_task(spec).name
        assert per_sample == pytest.approx({i: s for i, (_, s) in SCRIPT[task_name].items()}), spec
    assert results["pope"]["counts"]["unparsed"] == 1  # "Yes." under POPE's exact rule
    assert generator.calls == sum(-(-r["counts"]["samples"] // 2) for r in results.values())  # batches of 2
    summary = open(os.path.join(tmp_path, "summary.md")).read()
    assert "| mme | perception score | 200.00 | 4/4 | yes | cognition 50.00, total 250.00 |" in summary
    assert "| docvqa | ANLS | 81.82 | 2/2 | yes |  |" in summary
    assert json.load(open(os.path.join(tmp_path, "summary.json")))["gqa"]["score"] == 50.0


def test_rescore_recomputes_from_predictions(data_root, tmp_path, capsys):
    run(data_root, tmp_path, Scripted(data_root), specs=("textvqa", "mme"))
    before = read_results(tmp_path, "textvqa")
    # tamper with results and rewrite one prediction: rescoring must follow the predictions only
    os.remove(os.path.join(tmp_path, "mme", "results.json"))
    path = os.path.join(tmp_path, "textvqa", "predictions.jsonl")
    records = [json.loads(line) for line in open(path)]
    records[0]["prediction"] = "nous les gosses"  # 4 of 10 references: 1.0
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    assert cli_main(["eval", "--rescore", str(tmp_path)]) == 0
    assert "| textvqa | VQA accuracy | 100.00 | 2/2 | yes |" in capsys.readouterr().out
    after = read_results(tmp_path, "textvqa")
    assert after["score"] == 100.0 and before["score"] == 65.0
    assert read_results(tmp_path, "mme")["score"] == 200.0
    assert {k: v for k, v in after.items() if k not in ("score", "scored_at", "throughput")} == \
        {k: v for k, v in before.items() if k not in ("score", "scored_at", "throughput")}
    with pytest.raises(DataError, match="no task directories"):
        rescore(str(tmp_path / "textvqa"))


def test_resume_after_a_failure_generates_only_the_rest(data_root, tmp_path):
    specs = ("mme", "pope", "textvqa")
    clean = run(data_root, tmp_path / "clean", Scripted(data_root), specs=specs, batch_size=2)
    failing = Scripted(data_root, fail_on_call=2)  # mme's second batch fails
    with pytest.raises(RuntimeError, match="injected failure"):
        run(data_root, tmp_path / "run", failing, specs=specs, batch_size=2)
    with open(tmp_path / "run" / "mme" / "predictions.jsonl") as f:
        saved = [json.loads(line)["prompt"] for line in f]
    assert saved == failing.prompts and len(saved) == 2
    resumed = Scripted(data_root)
    results = run(data_root, tmp_path / "run", resumed, specs=specs, batch_size=2)
    assert len(resumed.prompts) == 4 + 3 + 2 - 2 and not set(saved) & set(resumed.prompts)
    for key in clean:
        assert results[key]["score"] == clean[key]["score"] and results[key]["counts"] == clean[key]["counts"]
        for name in ("predictions.jsonl", "samples.jsonl"):
            assert open(tmp_path / "run" / key / name).read() == open(tmp_path / "clean" / key / name).read()
    again = Scripted(data_root)
    run(data_root, tmp_path / "run", again, specs=specs, batch_size=2)
    assert again.calls == 0  # everything was done


KILLED_RUN = """
import sys, time, json
sys.path.insert(0, {tests!r})
from test_eval_runner import Scripted
from nvila_jax.eval import evaluate, make_task
scripted = Scripted({root!r})
def slow(requests):
    time.sleep(0.5)
    return scripted(requests)
print("ready", flush=True)
evaluate(slow, [make_task("mme"), make_task("pope")], data_root={root!r}, out={out!r},
         model_info={{"name": "scripted"}}, batch_size=1, progress=False)
"""


def test_resume_after_a_kill(data_root, tmp_path):
    """A process killed (SIGKILL) mid-task: the restarted run generates exactly the unfinished samples."""
    out = tmp_path / "run"
    script = KILLED_RUN.format(tests=os.path.dirname(__file__), root=data_root, out=str(out))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    predictions = out / "mme" / "predictions.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (predictions.exists() and predictions.read_text().count("\n") >= 2):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = [json.loads(line)["prompt"] for line in predictions.read_text().splitlines() if line]
    assert 2 <= len(done_before) < 4
    resumed = Scripted(data_root)
    results = run(data_root, out, resumed, specs=("mme", "pope"), batch_size=1)
    assert len(resumed.prompts) == 4 - len(done_before) + 3 and not set(done_before) & set(resumed.prompts)
    assert results["mme"]["score"] == 200.0 and results["mme"]["complete"]
    assert results["pope"]["score"] == pytest.approx(200 / 3)


def test_torn_last_line_is_dropped_and_repaired(data_root, tmp_path):
    with pytest.raises(RuntimeError):
        run(data_root, tmp_path, Scripted(data_root, fail_on_call=2), specs=("textvqa",), batch_size=1)
    path = tmp_path / "textvqa" / "predictions.jsonl"
    path.write_text(path.read_text() + '{"id": "34603", "prompt": "What co')  # a writer killed mid-line
    resumed = Scripted(data_root)
    results = run(data_root, tmp_path, resumed, specs=("textvqa",), batch_size=1)
    assert len(resumed.prompts) == 1 and results["textvqa"]["score"] == 65.0
    assert [json.loads(line)["id"] for line in path.read_text().splitlines()] == ["34602", "34603"]
    path.write_text('{"broken\n' + path.read_text())
    with pytest.raises(DataError, match=r"predictions.jsonl:1: corrupt prediction record"):
        run(data_root, tmp_path, Scripted(data_root), specs=("textvqa",))


def test_other_settings_or_model_are_refused(data_root, tmp_path):
    run(data_root, tmp_path, Scripted(data_root), specs=("egoschema",), default_num_frames=4)
    with pytest.raises(RunMismatchError, match=r"another settings.*\"frames\": 4.*\"frames\": 8"):
        run(data_root, tmp_path, Scripted(data_root), specs=("egoschema",), default_num_frames=8)
    with pytest.raises(RunMismatchError, match="another model"):
        evaluate(Scripted(data_root), [make_task("egoschema")], data_root=data_root, out=str(tmp_path),
                 model_info={"name": "another"}, default_num_frames=4, progress=False)


def test_limit_then_full_run(data_root, tmp_path):
    generator = Scripted(data_root)
    first = run(data_root, tmp_path, generator, specs=("mme",), limit=3)
    assert first["mme"]["counts"] == {"samples": 3, "predicted": 3, "missing": 0, "unparsed": 0}
    full = run(data_root, tmp_path, generator, specs=("mme",))
    assert len(generator.prompts) == 4 and full["mme"]["complete"] and full["mme"]["score"] == 200.0


def test_command_line_errors(tmp_path, capsys):
    assert cli_main(["eval", "--tasks", "textvqa", "--out", str(tmp_path)]) == 2
    assert "missing --model, --data-root" in capsys.readouterr().err
    assert cli_main(["eval", "--model", "m", "--data-root", "d", "--out", "o", "--tasks", "nosuch"]) == 2
    assert "unknown task 'nosuch'" in capsys.readouterr().err
    assert cli_main(["eval", "--rescore", str(tmp_path / "none")]) == 2
    assert "results directory not found" in capsys.readouterr().err
    assert cli_main(["eval", "--list-tasks"]) == 0
    listing = capsys.readouterr().out
    assert "videomme_w_subtitle" in listing and "frames=: frames per video" in listing


TWO_PROCESS_RUN = """
import json, os, sys
sys.path.insert(0, {tests!r})
from nvila_jax.distributed import initialize_from_env
initialize_from_env()
import jax
from test_eval_runner import Scripted
from nvila_jax.eval import evaluate, make_task
scripted = Scripted({root!r})
evaluate(scripted, [make_task("mme"), make_task("pope"), make_task("chartqa")], data_root={root!r},
         out={out!r}, model_info={{"name": "scripted"}}, batch_size=1, progress=False)
with open(os.path.join({out!r}, f"calls{{jax.process_index()}}.json"), "w") as f:
    json.dump({{"calls": scripted.calls, "prompts": scripted.prompts}}, f)
"""


def test_two_processes_share_the_samples(data_root, tmp_path):
    """Two jax.distributed processes: disjoint halves of the samples, the same number of generation calls
    (the shorter shard is padded), one merged predictions.jsonl per task, the same results as one process."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "two"
    script = TWO_PROCESS_RUN.format(tests=os.path.dirname(__file__), root=data_root, out=str(out))
    procs = [subprocess.Popen([sys.executable, "-c", script], env={
        **os.environ, "NVILA_NUM_PROCESSES": "2", "NVILA_PROCESS_ID": str(i), "NVILA_CPU_COLLECTIVES": "gloo",
        "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_PLATFORMS": "cpu"}) for i in range(2)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    calls = [json.load(open(out / f"calls{i}.json")) for i in range(2)]
    # mme: 4 samples -> 2 + 2; pope and chartqa: 3 -> 2 + 1, the shorter shard padded with a repeated request
    assert calls[0]["calls"] == calls[1]["calls"] == 2 + 2 + 2
    prompts = calls[0]["prompts"] + calls[1]["prompts"]
    assert len(set(prompts)) == 4 + 3 + 3 and len(prompts) == 4 + 3 + 3 + 2
    single = run(data_root, tmp_path / "one", Scripted(data_root), specs=("mme", "pope", "chartqa"))
    for key in ("mme", "pope", "chartqa"):
        assert sorted(os.listdir(out / key)) == ["predictions.jsonl", "results.json", "run.json", "samples.jsonl"]
        assert read_results(out, key)["score"] == single[key]["score"]
        one = (tmp_path / "one" / key / "predictions.jsonl").read_text()
        assert (out / key / "predictions.jsonl").read_text() == one


def test_model_fingerprint_ignores_location_and_conversion_time():
    from nvila_jax.eval.runner import with_fingerprint

    def info(path, created, config):
        return {"name": "m", "config_sha256": config, "parameters": 10, "checkpoint": path,
                "checkpoint_manifest": {"files": {"llm/model.safetensors": "ab12"}, "created": created}}

    a, b, c = info("/a", "t1", "1"), info("/b", "t2", "1"), info("/a", "t1", "2")
    assert with_fingerprint(a)["fingerprint"] == with_fingerprint(b)["fingerprint"]
    assert with_fingerprint(a)["fingerprint"] != with_fingerprint(c)["fingerprint"]
