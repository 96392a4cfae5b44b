"""`nvila-jax eval`: standard benchmarks with the official metrics, resumable; `--rescore` from predictions."""

from __future__ import annotations

import argparse
import sys

COMMAND = "eval"
HELP = "evaluate a checkpoint on image/video benchmarks (official metrics, resumable), or rescore predictions"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="DIR", help="converted checkpoint directory (nvila-jax convert)")
    p.add_argument("--tasks", help="comma-separated tasks, each optionally with options: "
                                   "textvqa,docvqa,videomme[frames=64] (see --list-tasks)")
    p.add_argument("--data-root", metavar="DIR", help="directory holding each benchmark's published files")
    p.add_argument("--out", metavar="DIR", help="results directory; an existing one is resumed")
    p.add_argument("--config", metavar="FILE", help="eval suite (configs/eval/*.py); fields can be overridden "
                                                    "with --config.<field>=<value>")
    p.add_argument("--batch-size", type=int, help="requests per generation batch and process (default 8)")
    p.add_argument("--limit", type=int, help="only the first N samples of each task (quick checks)")
    p.add_argument("--num-frames", type=int, help="frames per video for tasks without a frames= option "
                                                  "(default: the model's num_video_frames)")
    p.add_argument("--mesh-shape", help="device mesh for the model, e.g. data=1,fsdp=1,tensor=8 (single process; "
                                        "default: one device per process)")
    p.add_argument("--dtype", help="parameter/compute dtype (default: as stored)")
    p.add_argument("--rescore", metavar="DIR", help="recompute every score in DIR from its saved predictions")
    p.add_argument("--list-tasks", action="store_true", help="list the tasks, their options and data layout")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(_accepts_extra=True)


def _list_tasks() -> None:
    from nvila_jax.eval.tasks import TASKS

    for name, cls in TASKS.items():
        print(f"{name:22s} {cls.description}")
        for key, opt in {**cls.options, **cls.common_options}.items():
            default = "" if opt.default is None else f" (default {opt.default})"
            print(f"{'':24s}{key}=: {opt.help}{default}")


def run(args: argparse.Namespace) -> int:
    if args.list_tasks:
        _list_tasks()
        return 0
    try:
        return _run(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"nvila-jax eval: error: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from nvila_jax.eval import runner
    from nvila_jax.eval.suite import load_suite
    from nvila_jax.eval.tasks import make_task, parse_task_list

    if args.rescore:
        if args.extra:
            raise ValueError(f"unrecognized arguments: {' '.join(args.extra)}")
        runner.rescore(args.rescore)
        with open(f"{args.rescore}/summary.md", encoding="utf-8") as f:
            print(f.read(), end="")
        return 0
    suite = load_suite(args.config, args.extra) if args.config else None
    if args.extra and suite is None:
        raise ValueError(f"unrecognized arguments: {' '.join(args.extra)}")

    def setting(name: str, default=None):
        value = getattr(args, name)
        if value is None and suite is not None:
            value = suite.get(name)
        return default if value is None else value

    missing = [f"--{n.replace('_', '-')}" for n in ("model", "data_root", "out") if not getattr(args, n)]
    if not setting("tasks"):
        missing.append("--tasks (or --config)")
    if missing:
        raise ValueError(f"missing {', '.join(missing)} (or use --rescore DIR)")
    tasks = [make_task(spec) for spec in parse_task_list(setting("tasks"))]  # fail fast, before loading

    from nvila_jax.distributed import initialize_from_env

    initialize_from_env()
    import jax

    import nvila_jax

    if args.mesh_shape and jax.process_count() > 1:
        raise ValueError("--mesh-shape with several processes: evaluation needs one model copy per process (the "
                         "engine does not assemble a batch from several processes' requests); leave it out, or "
                         "run one process over all devices")

    model = nvila_jax.load_pretrained(args.model, mesh_shape=args.mesh_shape, dtype=args.dtype)
    runner.evaluate_model(model, tasks, data_root=args.data_root, out=args.out, model_dir=args.model,
                          batch_size=setting("batch_size", 8), limit=setting("limit"),
                          default_num_frames=setting("num_frames", model.config.num_video_frames),
                          progress=not args.no_progress)
    if jax.process_index() == 0:
        with open(f"{args.out}/summary.md", encoding="utf-8") as f:
            print(f.read(), end="")
    return 0
