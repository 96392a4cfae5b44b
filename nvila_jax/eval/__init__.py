"""Scripted evaluation: standard image and video benchmarks with the official metrics (as lmms-eval applies
them), batched generation sharded across processes, resumable predictions, `--rescore` from saved predictions.

    from nvila_jax.eval import evaluate_model, make_task
    evaluate_model(model, [make_task("textvqa"), make_task("videomme[frames=64]")],
                   data_root="/data/benchmarks", out="results/nvila-8b")

`nvila_jax.eval.metrics` holds the per-sample metrics (vqa_accuracy, anls, relaxed_accuracy, extract_choice,
yes_no); `nvila_jax.eval.tasks.TASKS` the benchmarks. See docs/eval.md.
"""

from nvila_jax.eval.runner import evaluate, evaluate_model, model_manifest, rescore
from nvila_jax.eval.tasks import TASKS, make_task, parse_task_list

__all__ = ["TASKS", "evaluate", "evaluate_model", "make_task", "model_manifest", "parse_task_list", "rescore"]
