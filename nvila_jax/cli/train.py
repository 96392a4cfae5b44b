"""`nvila-jax train --config configs/....py --workdir DIR [--config.key=value ...]`."""

from __future__ import annotations

import argparse

COMMAND = "train"
HELP = "train or fine-tune (resumes from DIR when it holds a checkpoint)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="an ml_collections config file (configs/*.py[:arg])")
    p.add_argument("--workdir", required=True, help="checkpoints, metrics.jsonl, tensorboard/ and model/ go here")
    p.epilog = "Any config key can be overridden: --config.num_train_steps=100 --config.data.seq_len=1024"
    p.set_defaults(_accepts_extra=True)


def run(args: argparse.Namespace) -> int:
    import sys

    from nvila_jax.distributed import initialize_from_env

    initialize_from_env()
    from nvila_jax.train.config import RunConfigError, load_config
    from nvila_jax.train.loop import train

    try:
        cfg = load_config(args.config, args.extra)
        return train(cfg, args.workdir)
    except RunConfigError as e:
        print(f"nvila-jax train: {e}", file=sys.stderr)
        return 2
