"""FP8 training through the real training loop (`--config.fp8.enabled=True`): a few steps run, stay close to
the bf16 run and resume bit-exactly with delayed scaling (amax histories in the checkpoint); slow: the tiny
model trained 200 steps with FP8 ends within 5% of the bf16 loss.

Every decoder linear is FP8 here (`fp8.min_features=0`): the tiny model's are far below NVILA's 3584.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from nvila_jax.train.checkpoint import ITEMS
from nvila_jax.train.config import RunConfigError, apply_overrides, fp8_config, tiny_config
from nvila_jax.train.loop import train

SMALL_RUN = ["--config.data.synthetic_records=24", "--config.data.rows_per_batch=2", "--config.data.seq_len=384",
             "--config.data.tile_buckets=(16,)", "--config.peak_tflops_per_device=1.0", "--config.log_every=1",
             "--config.compute_dtype=bfloat16", "--config.async_checkpointing=false"]
FP8 = ["--config.fp8.enabled=True", "--config.fp8.min_features=0"]
CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.py")


def metrics(workdir) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def run(workdir, overrides) -> list[dict]:
    """A training run in this process (`nvila-jax train`'s loop); returns its metrics."""
    cfg = tiny_config()
    apply_overrides(cfg, overrides)
    assert train(cfg, str(workdir)) == 0
    return metrics(workdir)


def run_cli(workdir, overrides, cache_dir) -> tuple[list[dict], str]:
    """`nvila-jax train` in a subprocess sharing a persistent compilation cache (a resumed run compiles
    nothing again); returns (metrics, stdout)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(cache_dir),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    cmd = [sys.executable, "-m", "nvila_jax", "train", "--config", CONFIG, "--workdir", str(workdir), *overrides]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    return metrics(workdir), out.stdout


def deterministic(records):
    return [(m["step"], m["loss"], m["grad_norm"], m["samples"]) for m in records]


def test_fp8_steps_through_the_loop_stay_close_to_bf16_and_resume_exactly(tmp_path):
    steps = ["--config.num_train_steps=3", "--config.save_every=2", "--config.keep_checkpoints=3"]
    cache = tmp_path / "jax_cache"
    bf16, _ = run_cli(tmp_path / "bf16", SMALL_RUN + steps, cache)
    fp8_dir = tmp_path / "fp8"
    fp8_run = SMALL_RUN + steps + FP8 + ["--config.fp8.scaling=delayed"]
    fp8, out = run_cli(fp8_dir, fp8_run, cache)
    assert "FP8 LLM linears (min(in, out) >= 0, delayed per-tensor scaling" in out

    got, want = np.array([m["loss"] for m in fp8]), np.array([m["loss"] for m in bf16])
    assert [m["samples"] for m in fp8] == [m["samples"] for m in bf16]  # the same data
    np.testing.assert_allclose(got, want, rtol=0.02)
    assert (got != want).all()  # the switch really quantizes

    # The histories are in the checkpoint: step 2's forward passes pushed one amax each (one micro-batch).
    manager = ocp.CheckpointManager(str(fp8_dir / "checkpoints"), item_names=ITEMS,
                                    options=ocp.CheckpointManagerOptions(read_only=True))
    opt = manager.restore(2, args=ocp.args.Composite(opt=ocp.args.StandardRestore()))["opt"]
    manager.close()
    histories = jax.tree.leaves(opt["fp8_meta"])
    assert len(histories) == 7 * 3  # q, k, v, o, gate, up, down x (input, kernel, output gradient)
    for h in histories:  # [layers, history]: two steps recorded, the rest still empty
        assert (np.asarray(h)[:, :2] > 0).all() and (np.asarray(h)[:, 2:] == 0).all()

    # Resume from step 2 (as after a kill right after that save): step 3 scales from the restored histories.
    shutil.rmtree(fp8_dir / "checkpoints" / "3")
    resumed, out = run_cli(fp8_dir, fp8_run, cache)
    assert "resumed from" in out
    assert deterministic(resumed) == deterministic(fp8)


def test_fp8_config_errors():
    for override, msg in (("--config.fp8.scaling=late", "fp8 scaling 'late'"), ("--config.fp8.gemm=int4", "fp8 gemm"),
                          ("--config.fp8.amax_history_length=0", "fp8 amax_history_length must be >= 1")):
        cfg = tiny_config()
        apply_overrides(cfg, [override])
        with pytest.raises(RunConfigError, match=f"config.fp8: {msg}"):
            fp8_config(cfg)
    with pytest.raises(RunConfigError, match="unknown key"):
        apply_overrides(tiny_config(), ["--config.fp8.history=4"])


@pytest.mark.slow
def test_fp8_training_200_steps_within_5_percent_of_bf16(tmp_path):
    """The tiny demo model from scratch, 200 steps: FP8 (dynamic scaling, the reference recipe) against bf16,
    both through `nvila-jax train`'s loop on the same data; compared on the mean of the last five logged losses."""
    common = ["--config.num_train_steps=200", "--config.log_every=10", "--config.save_every=1000",
              "--config.data.rows_per_batch=4", "--config.data.synthetic_records=800",
              "--config.compute_dtype=bfloat16", "--config.peak_tflops_per_device=1.0"]
    bf16 = [m["loss"] for m in run(tmp_path / "bf16", common)]
    fp8 = [m["loss"] for m in run(tmp_path / "fp8", common + FP8)]
    first, last_bf16, last_fp8 = bf16[0], np.mean(bf16[-5:]), np.mean(fp8[-5:])
    assert last_bf16 < 0.5 * first  # the run learned something, so the comparison means something
    assert abs(last_fp8 - last_bf16) <= 0.05 * last_bf16, (first, last_bf16, last_fp8)
