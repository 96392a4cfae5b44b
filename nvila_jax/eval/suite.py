"""Eval suites: ml_collections config files (configs/eval/*.py) naming the tasks and run settings, overridable
from the command line with `--config.<field>=<value>`."""

from __future__ import annotations

import importlib.util
import os
from typing import Sequence

import ml_collections

# The fields a suite may set; anything else is a typo the user should hear about.
SUITE_FIELDS = ("tasks", "batch_size", "limit", "num_frames")


def load_suite(path: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """`get_config()` of a Python config file, then `--config.key=value` overrides (typed by the field)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: eval suite config not found")
    spec = importlib.util.spec_from_file_location("nvila_eval_suite", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"{path}: an eval suite config must define get_config()")
    config = module.get_config()
    unknown = sorted(set(config.keys()) - set(SUITE_FIELDS))
    if unknown:
        raise ValueError(f"{path}: unknown field(s) {', '.join(unknown)}; an eval suite sets {', '.join(SUITE_FIELDS)}")
    for item in overrides:
        key, eq, value = item.removeprefix("--config.").partition("=")
        if not item.startswith("--config.") or not eq:
            raise ValueError(f"unrecognized argument {item!r}; config overrides are written --config.<field>=<value>")
        if key not in config:
            raise ValueError(f"--config.{key}: no such field in {path} (fields: {', '.join(config.keys())})")
        kind = config.get_ref(key).get_type()
        try:
            config[key] = None if value.lower() == "none" else kind(value)
        except (TypeError, ValueError):
            raise ValueError(f"--config.{key}={value!r}: expected a {kind.__name__}") from None
    return config
