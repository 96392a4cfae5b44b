"""Exact resume: `nvila-jax train` killed with SIGKILL at random steps (or preempted with SIGTERM) and
restarted writes the same metrics.jsonl (losses bit-exact on CPU, same data order) as an uninterrupted run."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

STEPS = 10
ARGS = [f"--config.num_train_steps={STEPS}", "--config.save_every=2", "--config.log_every=1",
        "--config.data.synthetic_records=48", "--config.data.rows_per_batch=2", "--config.data.seq_len=384",
        "--config.data.tile_buckets=(16,)", "--config.peak_tflops_per_device=1.0"]
CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.py")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Subprocess environment sharing a persistent compilation cache (the same programs every run)."""
    cache = str(tmp_path_factory.mktemp("jax_cache"))
    return {**os.environ, "JAX_COMPILATION_CACHE_DIR": cache, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0", "JAX_PLATFORMS": "cpu"}


def command(workdir, extra=()):
    return [sys.executable, "-m", "nvila_jax", "train", "--config", CONFIG, "--workdir", str(workdir), *ARGS, *extra]


def metrics(workdir):
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.endswith("\n")]


def run_to_end(workdir, env, extra=()):
    out = subprocess.run(command(workdir, extra), env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def start_and_signal(workdir, env, at_step, sig, extra=()):
    """Starts a run and sends `sig` once it has logged `at_step`; returns (returncode, stdout)."""
    proc = subprocess.Popen(command(workdir, extra), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        while proc.poll() is None:
            logged = metrics(workdir)
            if logged and logged[-1]["step"] >= at_step:
                proc.send_signal(sig)
                break
            time.sleep(0.02)
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, out


def deterministic(records):
    return [(m["step"], m["loss"], m["grad_norm"], m["samples"], m["trained_tokens"]) for m in records]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, env):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    run_to_end(workdir, env)
    records = metrics(workdir)
    assert [m["step"] for m in records] == list(range(1, STEPS + 1))
    return deterministic(records)


# Three kill points (the minimum), each drawn from its seed.
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sigkill_at_a_random_step_then_resume(seed, reference, tmp_path, env):
    kill_at = random.Random(seed).randint(3, STEPS - 2)
    code, out = start_and_signal(tmp_path, env, kill_at, signal.SIGKILL)
    assert code == -signal.SIGKILL, out
    logged = metrics(tmp_path)
    assert kill_at <= logged[-1]["step"] < STEPS
    out = run_to_end(tmp_path, env)
    assert "resumed from" in out
    assert deterministic(metrics(tmp_path)) == reference


def test_sigterm_saves_and_resumes(reference, tmp_path, env):
    code, out = start_and_signal(tmp_path, env, 4, signal.SIGTERM)
    assert code == 143, out
    assert "preempted: saved step" in out
    saved = int(out.split("preempted: saved step ")[1].split()[0])
    assert os.path.isdir(tmp_path / "checkpoints" / str(saved))
    run_to_end(tmp_path, env)
    assert deterministic(metrics(tmp_path)) == reference
    assert os.path.isfile(tmp_path / "model" / "config.json")  # the finished run exports a loadable model


@pytest.mark.slow
def test_mesh_run_resumes_and_matches_one_device(reference, tmp_path, env):
    """`--config.mesh` on 4 (fake CPU) devices: killed, resumed from the sharded checkpoint, same losses as
    the one-device run to float tolerance."""
    mesh_env = {**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    mesh = ["--config.mesh=data=2,fsdp=2"]
    code, out = start_and_signal(tmp_path, mesh_env, 4, signal.SIGKILL, mesh)
    assert code == -signal.SIGKILL, out
    out = run_to_end(tmp_path, mesh_env, mesh)
    assert "resumed from" in out
    got = deterministic(metrics(tmp_path))
    assert [g[0] for g in got] == [r[0] for r in reference]
    for g, r in zip(got, reference):
        assert g[1] == pytest.approx(r[1], rel=1e-5) and g[3:] == r[3:]
