"""The evaluation runner: batched generation over each task's samples, sharded across processes, predictions
saved as they finish (a killed job resumes where it stopped), then the official scores.

Output directory layout (`--out`):

    <task>/run.json            the task, its settings, the model, the sample ids (resume check, rescoring)
    <task>/predictions.jsonl   one line per finished sample: id, prompt, media, prediction, target
    <task>/samples.jsonl       the same samples scored: id, prediction, parsed answer, score
    <task>/results.json        score, all metrics, counts, settings, model and checkpoint manifest
    summary.md, summary.json   every task's results in one table

Data parallelism: every process reads the same sample list, drops the finished ones, and takes every
`process_count`-th of the rest; shards are padded to the same number of equally sized batches, so a model
that runs its batches as one program across processes sees every process take part in every call. Within
a process, `generate_batch` spreads a batch over the local devices.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import time
from typing import TYPE_CHECKING, Any, Sequence

from tqdm import tqdm

import nvila_jax
from nvila_jax.eval.formats import DataError
from nvila_jax.eval.store import PredictionStore, write_atomic, write_json
from nvila_jax.eval.tasks import Task, make_task
from nvila_jax.eval.tasks.base import Sample

if TYPE_CHECKING:
    from nvila_jax.eval.generation import GenerateBatch

RUN_FILE, RESULTS_FILE, SAMPLES_FILE = "run.json", "results.json", "samples.jsonl"


class RunMismatchError(ValueError):
    """A results directory holds predictions made with other settings or another model."""


# ---------------------------------------------------------------------------------------------------------
# Model identity

def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def model_manifest(model: Any, model_dir: str | None = None) -> dict[str, Any]:
    """What identifies the model a run evaluates: config, parameter count and, for a checkpoint directory,
    its path and manifest (source file checksums). `fingerprint` changes when any of them does."""
    import jax

    info: dict[str, Any] = {
        "name": model.config.name,
        "config_sha256": _sha256(model.config.to_json()),
        "parameters": int(sum(leaf.size for leaf in jax.tree.leaves(model.params))),
    }
    if model_dir is not None:
        info["checkpoint"] = os.path.abspath(model_dir)
        manifest = os.path.join(model_dir, "manifest.json")
        if os.path.isfile(manifest):
            with open(manifest, encoding="utf-8") as f:
                # the per-tensor layout kept for export is left out: the source checksums identify it
                info["checkpoint_manifest"] = {k: v for k, v in json.load(f).items() if k != "tensor_files"}
    return with_fingerprint(info)


def with_fingerprint(info: dict[str, Any]) -> dict[str, Any]:
    """`info` plus a fingerprint of what identifies the model: not where the checkpoint lies nor when it was
    converted."""
    identity = {k: v for k, v in info.items() if k not in ("checkpoint", "fingerprint")}
    if isinstance(identity.get("checkpoint_manifest"), dict):
        identity["checkpoint_manifest"] = {k: v for k, v in identity["checkpoint_manifest"].items()
                                           if k not in ("created", "created_by")}
    return {**info, "fingerprint": _sha256(json.dumps(identity, sort_keys=True, default=str))}


# ---------------------------------------------------------------------------------------------------------
# Running

def _pad_shard(pending: list[Sample], index: int, count: int) -> list[Sample | None]:
    """This process's samples, padded with None to the length of the longest shard."""
    per_process = -(-len(pending) // count)
    mine: list[Sample | None] = list(pending[index::count])
    return mine + [None] * (per_process - len(mine))


def _record(sample: Sample, prediction: str) -> dict[str, Any]:
    media = [im if isinstance(im, str) else "<embedded image>" for im in sample.images]
    return {"id": sample.id, "prompt": sample.prompt, "media": media + ([sample.video] if sample.video else []),
            "prediction": prediction, "target": sample.target}


def _check_run(task_dir: str, run: dict[str, Any], write: bool) -> None:
    """Refuses to add to predictions made with other settings or another model; (re)writes run.json."""
    path = os.path.join(task_dir, RUN_FILE)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
        for key, what in (("settings", "settings"), ("model_fingerprint", "model")):
            if old.get(key) != run[key]:
                raise RunMismatchError(
                    f"{task_dir} holds predictions made with another {what}: saved {json.dumps(old.get(key))}, "
                    f"now {json.dumps(run[key])}. Use another --out directory, or delete {task_dir} to start over.")
    if write:
        os.makedirs(task_dir, exist_ok=True)
        write_json(path, run)


def _barrier(name: str, process_count: int) -> None:
    if process_count > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"nvila_jax.eval:{name}")


def evaluate(generate_batch: GenerateBatch, tasks: Sequence[Task], *, data_root: str, out: str,
             model_info: dict[str, Any], default_num_frames: int = 8, batch_size: int = 8,
             limit: int | None = None, progress: bool = True) -> dict[str, dict[str, Any]]:
    """Runs every task (resuming from the predictions already in `out`) and returns {task key: results}.

    `generate_batch` maps a list of inference GenerationRequests to answers (nvila_jax.eval.generation);
    `model_info` identifies the model (`model_manifest`, or any dict for other callables).
    """
    import jax

    from nvila_jax.eval.generation import sample_request

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    model_info = model_info if "fingerprint" in model_info else with_fingerprint(model_info)
    index, count = jax.process_index(), jax.process_count()
    results = {}
    for task in tasks:
        samples = task.load(data_root, default_num_frames)[:limit]
        task_dir = os.path.join(out, task.key)
        run = {"task": task.spec, "key": task.key, "settings": task.settings(default_num_frames),
               "model_fingerprint": model_info["fingerprint"], "model": model_info,
               "data_root": os.path.abspath(data_root), "limit": limit, "sample_ids": [s.id for s in samples]}
        _check_run(task_dir, run, write=index == 0)
        store = PredictionStore(task_dir, index, count)
        done = store.load()
        _barrier(f"start:{task.key}", count)  # every process has read the same finished set before any adds to it
        pending = [s for s in samples if s.id not in done]
        mine = _pad_shard(pending, index, count)
        generated, started = 0, time.perf_counter()
        with tqdm(total=sum(s is not None for s in mine), desc=task.key, unit="sample",
                  disable=not progress or index != 0) as bar:
            for start in range(0, len(mine), batch_size):
                batch = mine[start:start + batch_size]
                filler = next(s for s in batch + pending if s is not None)
                requests = [sample_request(s or filler, task.generation_length) for s in batch]
                answers = generate_batch(requests)
                if len(answers) != len(requests):
                    raise RuntimeError(f"generate_batch returned {len(answers)} answers for {len(requests)} requests")
                finished = [_record(s, a) for s, a in zip(batch, answers) if s is not None]
                store.append(finished)
                generated += len(finished)
                bar.update(len(finished))
        seconds = time.perf_counter() - started
        _barrier(f"end:{task.key}", count)
        if index == 0:
            store.merge([s.id for s in samples])
            results[task.key] = score_task_dir(task_dir, throughput={"generated": generated, "seconds": seconds})
    if index == 0:
        write_summary(out)
    return results


def evaluate_model(model: Any, tasks: Sequence[Task], *, data_root: str, out: str, model_dir: str | None = None,
                   **kwargs: Any) -> dict[str, dict[str, Any]]:
    """`evaluate` for an NVILAModel: its batched generation, its manifest, its default frame count."""
    from nvila_jax.eval.generation import model_generator

    kwargs.setdefault("default_num_frames", model.config.num_video_frames)
    return evaluate(model_generator(model), tasks, data_root=data_root, out=out,
                    model_info=model_manifest(model, model_dir), **kwargs)


# ---------------------------------------------------------------------------------------------------------
# Scoring (also `--rescore`: from the saved predictions alone)

def score_task_dir(task_dir: str, throughput: dict[str, Any] | None = None) -> dict[str, Any]:
    """Scores a task directory's predictions; writes samples.jsonl and results.json; returns the results."""
    path = os.path.join(task_dir, RUN_FILE)
    if not os.path.isfile(path):
        raise DataError(f"{task_dir}: no {RUN_FILE}; not a task directory of `nvila-jax eval`")
    with open(path, encoding="utf-8") as f:
        run = json.load(f)
    task = make_task(run["task"])
    done = PredictionStore(task_dir).load()
    records = [done[i] for i in run["sample_ids"] if i in done]
    rows = [{"id": r["id"], "prediction": r["prediction"], "target": r["target"],
             **task.score(r["prediction"], r["target"])} for r in records]
    write_atomic(os.path.join(task_dir, SAMPLES_FILE), "".join(
        json.dumps({k: r[k] for k in ("id", "prediction", "parsed", "score")}, ensure_ascii=False) + "\n"
        for r in rows))
    summary = task.aggregate(rows) if rows else {"score": None, "metrics": {}}
    results = {
        "task": run["key"],
        "spec": run["task"],
        "description": task.description,
        "metric": task.metric,
        "score": summary["score"],
        "metrics": summary["metrics"],
        "counts": {"samples": len(run["sample_ids"]), "predicted": len(rows),
                   "missing": len(run["sample_ids"]) - len(rows), "unparsed": sum(r["parsed"] == "" for r in rows)},
        "complete": len(rows) == len(run["sample_ids"]),
        "limit": run["limit"],
        "settings": run["settings"],
        "model": run["model"],
        "data_root": run["data_root"],
        "nvila_jax_version": nvila_jax.__version__,
        "scored_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if throughput is not None:
        rate = throughput["generated"] / throughput["seconds"] if throughput["seconds"] > 0 else None
        results["throughput"] = {**throughput, "samples_per_second": rate}
    write_json(os.path.join(task_dir, RESULTS_FILE), results)
    return results


def task_dirs(out: str) -> list[str]:
    if not os.path.isdir(out):
        raise DataError(f"{out}: results directory not found")
    return sorted(os.path.join(out, d) for d in os.listdir(out) if os.path.isfile(os.path.join(out, d, RUN_FILE)))


def rescore(out: str) -> dict[str, dict[str, Any]]:
    """Recomputes every task's scores in `out` from its saved predictions (no model), and the summary."""
    dirs = task_dirs(out)
    if not dirs:
        raise DataError(f"{out}: no task directories (with {RUN_FILE}) to rescore")
    results = {}
    for d in dirs:
        result = score_task_dir(d)
        results[result["task"]] = result
    write_summary(out)
    return results


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.2f}" if isinstance(value, float) else str(value)


def write_summary(out: str) -> str:
    """summary.md (a Markdown table of every task in `out`) and summary.json; returns the Markdown."""
    results = []
    for d in task_dirs(out):
        path = os.path.join(d, RESULTS_FILE)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                results.append(json.load(f))
    models = sorted({r["model"].get("checkpoint") or r["model"].get("name", "?") for r in results})
    lines = ["# nvila_jax evaluation", "", f"Model: {', '.join(models) or '-'}", "",
             "| Task | Metric | Score | Samples | Complete | Details |", "|---|---|---:|---:|---|---|"]
    for r in results:
        details = ", ".join(f"{k} {_fmt(v)}" for k, v in r["metrics"].items()
                            if k in make_task(r["spec"]).summary_metrics)
        counts = r["counts"]
        lines.append(f"| {r['task']} | {r['metric']} | {_fmt(r['score'])} | {counts['predicted']}/{counts['samples']} "
                     f"| {'yes' if r['complete'] else 'no'} | {details} |")
    text = "\n".join(lines) + "\n"
    write_atomic(os.path.join(out, "summary.md"), text)
    write_json(os.path.join(out, "summary.json"), {r["task"]: {"metric": r["metric"], "score": r["score"],
                                                               "metrics": r["metrics"], "counts": r["counts"],
                                                               "complete": r["complete"]} for r in results})
    return text
