"""`nvila-jax plot DIR`: the loss curve of a training run (DIR/metrics.jsonl) as a PNG."""

from __future__ import annotations

import argparse

COMMAND = "plot"
HELP = "write a PNG loss curve of a training run directory"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("workdir", help="a training run directory (with metrics.jsonl)")
    p.add_argument("--out", default=None, help="PNG path (default: DIR/loss.png)")
    p.add_argument("--smooth", type=int, default=0, help="moving-average window in logged steps (0: none)")


def run(args: argparse.Namespace) -> int:
    import os
    import sys

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from nvila_jax.train.metrics import read_metrics

    records = [m for m in read_metrics(args.workdir) if isinstance(m.get("loss"), (int, float))]
    if not records:
        print(f"nvila-jax plot: no logged losses in {os.path.join(args.workdir, 'metrics.jsonl')}", file=sys.stderr)
        return 2
    steps = np.asarray([m["step"] for m in records])
    loss = np.asarray([m["loss"] for m in records], np.float64)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    ax.plot(steps, loss, lw=1, alpha=0.4 if args.smooth > 1 else 1.0, label="loss")
    if args.smooth > 1 and len(loss) >= args.smooth:
        kernel = np.ones(args.smooth) / args.smooth
        ax.plot(steps[args.smooth - 1:], np.convolve(loss, kernel, mode="valid"), lw=2,
                label=f"moving average ({args.smooth})")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats / trained token)")
    if loss.min() > 0 and loss.max() / loss.min() > 20:
        ax.set_yscale("log")
    ax.set_title(os.path.basename(os.path.abspath(args.workdir)))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = args.out or os.path.join(args.workdir, "loss.png")
    tmp = out + ".tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, out)
    print(f"wrote {out} ({len(records)} logged steps, loss {loss[0]:.3f} -> {loss[-1]:.3f})")
    return 0
