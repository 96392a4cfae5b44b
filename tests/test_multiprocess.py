"""Two processes on one machine form one 8-device mesh (jax.distributed started from environment variables,
gloo CPU collectives, 4 fake devices each): a sharded score and (-m slow) a training step equal one device,
each process loads only its rows of a global batch, and only process 0 writes. (Sharded generate and the
training step on every mesh are covered on 8 devices in one process by test_sharding*.py.)
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from test_sharding import HERE, QUESTION, TOL, sample_image
from test_sharding_train import make_step, max_abs_diff, one_step_batch, run_steps, sharded_step, train_test_config

GLOBAL_ROWS = 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(out: str, train: bool) -> None:
    """Score and global-batch cases, or with `train` the training step, into OUT (process 0 only)."""
    from nvila_jax.distributed import initialize_from_env

    assert initialize_from_env(), "the NVILA_* variables should have started jax.distributed"
    import jax

    from nvila_jax import sharding
    from nvila_jax.distributed import is_primary, to_host

    assert (jax.process_count(), jax.device_count(), jax.local_device_count()) == (2, 8, 4)
    cfg, key = train_test_config(), jax.random.key(0)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    params = sharding.init_params_sharded(cfg, key, mesh)
    gathered = jax.tree.map(to_host, params)  # the same values, whole, in each process
    if train:
        results = _train_step_cases(cfg, mesh, params, gathered)
    else:
        results = _score_and_rows_cases(cfg, mesh, params, gathered)
    if is_primary():
        np.savez(os.path.join(out, f"results-{jax.process_index()}.npz"), **results)
    jax.distributed.shutdown()


def _train_step_cases(cfg, mesh, params, gathered) -> dict[str, np.ndarray]:
    import tempfile

    import jax
    import jax.numpy as jnp

    from nvila_jax import sharding
    from nvila_jax.distributed import to_host
    from nvila_jax.train.step import init_train_state

    results = {}
    # One optimizer step on the global mesh and on this process's first device. Both processes pass the same
    # host batch (from the real pipeline; the scratch files are not the run's output, so not under OUT).
    batch = one_step_batch(cfg, tempfile.mkdtemp())
    tx, step = make_step(cfg)
    state, step_fn, placed = sharded_step(cfg, tx, step, params, mesh, batch)
    with sharding.activate(mesh):
        state, results["sharded_metrics"] = run_steps(state, step_fn, placed, steps=1)
    single, results["single_metrics"] = run_steps(init_train_state(gathered, tx, 0), jax.jit(step),
                                                  {k: jnp.asarray(v) for k, v in batch.items()}, steps=1)
    results["param_maxdiff"] = np.asarray(max_abs_diff(jax.tree.map(to_host, state.params), single.params))
    results["param_change"] = np.asarray(max_abs_diff(single.params, gathered))
    return results


def _score_and_rows_cases(cfg, mesh, params, gathered) -> dict[str, np.ndarray]:
    import jax

    from nvila_jax import sharding
    from nvila_jax.distributed import global_batch, local_rows, to_host
    from nvila_jax.model import NVILAModel
    from nvila_jax.text.tiny_tokenizer import build_tiny_tokenizer

    tok, image = build_tiny_tokenizer(), sample_image()
    results = {
        "sharded_score": NVILAModel(cfg, params, tok, mesh=mesh).score(QUESTION, images=[image]),
        "single_score": NVILAModel(cfg, gathered, tok).score(QUESTION, images=[image]),  # this process's device 0
    }
    # Each process reads only its rows; a program over the global batch sees all of them.
    full = np.arange(GLOBAL_ROWS * 3, dtype=np.int32).reshape(GLOBAL_ROWS, 3)
    rows = local_rows(sharding.batch_sharding(mesh, full.shape), full.shape)
    rows_batch = global_batch({"x": full[rows]}, mesh, GLOBAL_ROWS)
    results["doubled"] = to_host(jax.jit(lambda x: x * 2)(rows_batch["x"]))
    results["full"] = full
    print(json.dumps({"process": jax.process_index(), "rows": [rows.start, rows.stop]}), flush=True)
    return results


def launch_two_processes(out: str, train: bool = False):
    """Runs this file as processes 0 and 1 of one job; returns (process 0's arrays, each process's printed
    report, the files in OUT)."""
    port = _free_port()
    procs = []
    for pid in range(2):
        env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
                   NVILA_NUM_PROCESSES="2", NVILA_PROCESS_ID=str(pid), JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                   NVILA_CPU_COLLECTIVES="gloo")
        args = [sys.executable, os.path.join(HERE, "test_multiprocess.py"), "--out", out] + (["--train"] if train else [])
        procs.append(subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=900))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for pid, (p, (stdout, stderr)) in enumerate(zip(procs, outputs)):
        if p.returncode:
            pytest.fail(f"process {pid} failed ({p.returncode}):\n{stdout[-3000:]}\n{stderr[-6000:]}")
    reports = [[json.loads(line) for line in stdout.splitlines() if line.startswith("{")] for stdout, _ in outputs]
    return dict(np.load(os.path.join(out, "results-0.npz"))), reports, os.listdir(out)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    return launch_two_processes(str(tmp_path_factory.mktemp("multiprocess")))


def test_two_process_sharded_score_equals_one_device(two_processes):
    arrays, _, _ = two_processes
    assert arrays["sharded_score"].shape == arrays["single_score"].shape
    np.testing.assert_allclose(arrays["sharded_score"], arrays["single_score"], atol=TOL, rtol=0)


def test_two_process_train_step_equals_one_device(tmp_path):
    arrays, _, files = launch_two_processes(str(tmp_path), train=True)
    assert files == ["results-0.npz"]
    assert arrays["single_metrics"][0, 0] > 1.0
    np.testing.assert_allclose(arrays["sharded_metrics"], arrays["single_metrics"], rtol=TOL, atol=0)
    assert arrays["param_change"] > 1e-3
    assert arrays["param_maxdiff"] <= TOL


def test_each_process_loads_its_own_rows_of_the_global_batch(two_processes):
    arrays, reports, _ = two_processes
    rows = {r["process"]: r["rows"] for report in reports for r in report}
    assert rows == {0: [0, GLOBAL_ROWS // 2], 1: [GLOBAL_ROWS // 2, GLOBAL_ROWS]}  # data axis spans processes
    np.testing.assert_array_equal(arrays["doubled"], 2 * arrays["full"])


def test_only_the_primary_process_writes(two_processes):
    assert two_processes[2] == ["results-0.npz"]


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--train", action="store_true")
    cli = parser.parse_args()
    _worker(cli.out, cli.train)
