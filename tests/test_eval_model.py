"""`nvila-jax eval` with a real (tiny, random) NVILA: a converted checkpoint loaded with `load_pretrained`,
generation through the inference engine, a run interrupted and resumed without re-generating finished
samples; every benchmark format with the tiny model (slow)."""

from __future__ import annotations

import json
import os

import jax
import pytest

from helpers.eval_data import write_benchmarks
from nvila_jax.cli import main as cli_main
from nvila_jax.eval import evaluate_model, make_task
from nvila_jax.model import NVILAModel
from nvila_jax.models.nvila import init_params
from nvila_jax.variants import tiny

# the first two questions of the generic task: an image and a video (frame directory); short generations
SPECS = ("jsonl[file=custom/questions.jsonl,frames=4,max_new_tokens=3]",)
LIMIT = 2


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("benchmarks"))
    write_benchmarks(root)
    return root


@pytest.fixture(scope="module")
def model(tiny_tokenizer):
    cfg = tiny()
    return NVILAModel(cfg, init_params(cfg, jax.random.key(0)), tiny_tokenizer)


class Spy:
    """Wraps NVILAModel.generate_batch: records every request and answer; can fail on a given call."""

    def __init__(self, monkeypatch, fail_on_call=None):
        self.calls, self.requests, self.answers, self.fail_on_call = 0, [], [], fail_on_call
        original = NVILAModel.generate_batch

        def generate_batch(model, requests, **kw):
            self.calls += 1
            if self.calls == self.fail_on_call:
                raise RuntimeError("injected failure")
            out = original(model, requests, **kw)
            self.requests += requests
            self.answers += [g.text for g in out]
            return out

        monkeypatch.setattr(NVILAModel, "generate_batch", generate_batch)


def records(out, key):
    with open(os.path.join(out, key, "predictions.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_command_line_run_interrupted_and_resumed(tiny_checkpoint, data_root, tmp_path, monkeypatch, capsys):
    """`nvila-jax eval --model DIR`: the checkpoint loads with load_pretrained, the engine answers in batches,
    a run that fails half-way resumes without re-generating finished samples and ends with the same results."""
    checkpoint = tiny_checkpoint[1]
    import nvila_jax

    real_load, loaded = nvila_jax.load_pretrained, []

    def load_once(path, **kwargs):  # later runs reuse the first model (and its compiled programs)
        assert path == checkpoint
        if not loaded:
            loaded.append(real_load(path, **kwargs))
        return loaded[0]

    monkeypatch.setattr(nvila_jax, "load_pretrained", load_once)
    task = make_task(SPECS[0])
    samples = task.load(data_root, 8)[:LIMIT]

    def cli(out, fail_on_call=None):
        with monkeypatch.context() as m:
            spy = Spy(m, fail_on_call)
            code = cli_main(["eval", "--model", checkpoint, "--tasks", SPECS[0], "--data-root", data_root,
                             "--out", str(out), "--batch-size", "1", "--limit", str(LIMIT), "--no-progress"])
        return code, spy

    code, spy = cli(tmp_path / "clean")
    assert code == 0
    printed = capsys.readouterr().out
    assert f"| {task.key} | accuracy |" in printed and "| 2/2 | yes |" in printed
    # what the model was asked is what the samples say, and its answers are what got saved
    assert [r.prompt for r in spy.requests] == [s.prompt for s in samples]
    assert [r.video for r in spy.requests] == [s.video for s in samples]
    assert [len(r.images) for r in spy.requests] == [1, 0]
    assert [r.num_frames for r in spy.requests] == [None, 4]
    assert {r.sampling.max_new_tokens for r in spy.requests} == {3}
    assert [r["prediction"] for r in records(tmp_path / "clean", task.key)] == spy.answers
    with open(tmp_path / "clean" / task.key / "results.json") as f:
        clean = json.load(f)
    assert clean["model"]["checkpoint"] == os.path.abspath(checkpoint) and clean["complete"]
    manifest = clean["model"]["checkpoint_manifest"]
    assert manifest["format"].startswith("nvila_jax.checkpoint") and manifest["files"]  # source checksums
    assert clean["throughput"]["generated"] == 2

    with pytest.raises(RuntimeError, match="injected failure"):
        cli(tmp_path / "run", fail_on_call=2)
    assert len(records(tmp_path / "run", task.key)) == 1
    code, spy = cli(tmp_path / "run")
    assert code == 0 and [r.prompt for r in spy.requests] == [s.prompt for s in samples[1:]]
    with open(tmp_path / "run" / task.key / "results.json") as f:
        resumed = json.load(f)
    assert resumed["score"] == clean["score"] and resumed["counts"] == clean["counts"]
    assert records(tmp_path / "run", task.key) == records(tmp_path / "clean", task.key)
    code, spy = cli(tmp_path / "run")
    assert code == 0 and spy.calls == 0  # everything is done


@pytest.mark.slow
def test_tiny_model_on_every_format(model, data_root, tmp_path):
    specs = write_benchmarks(str(tmp_path / "data"))
    tasks = [make_task(s[:-1] + ",max_new_tokens=2]" if s.endswith("]") else s + "[max_new_tokens=2]")
             for s in specs]
    results = evaluate_model(model, tasks, data_root=str(tmp_path / "data"), out=str(tmp_path / "out"),
                             batch_size=4, progress=False)
    assert len(results) == len(specs)
    for task in tasks:
        r = results[task.key]
        assert r["complete"] and r["counts"]["predicted"] == len(task.load(str(tmp_path / "data"), 8))
        assert len(records(tmp_path / "out", task.key)) == r["counts"]["samples"]
