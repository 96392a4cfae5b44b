"""Eval suites: ml_collections config files (configs/eval/*.py) naming the tasks and run settings, loaded and
overridden (`--config.<field>=<value>`) like the training configs."""

from __future__ import annotations

from typing import Sequence

import ml_collections

from nvila_jax.train.config import load_config

# The fields a suite may set; anything else is a typo the user should hear about.
SUITE_FIELDS = ("tasks", "batch_size", "limit", "num_frames")


def load_suite(path: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """`get_config()` of an eval suite file, with command-line overrides applied."""
    config = load_config(path, overrides)
    unknown = sorted(set(config.keys()) - set(SUITE_FIELDS))
    if unknown:
        raise ValueError(f"{path}: unknown field(s) {', '.join(unknown)}; an eval suite sets {', '.join(SUITE_FIELDS)}")
    return config
