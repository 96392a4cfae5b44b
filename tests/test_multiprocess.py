"""Two processes on one machine form one 8-device mesh (jax.distributed started from environment variables,
gloo CPU collectives, 4 fake devices each): a sharded score equals one device, each process loads only its
rows of a global batch, and only process 0 writes. (Sharded generate is covered on 8 devices in one process
by test_sharding.py.)
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from test_sharding import HERE, QUESTION, TOL, mesh_test_config, sample_image

GLOBAL_ROWS = 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(out: str) -> None:
    from nvila_jax.distributed import initialize_from_env

    assert initialize_from_env(), "the NVILA_* variables should have started jax.distributed"
    import jax

    from nvila_jax import sharding
    from nvila_jax.distributed import global_batch, is_primary, local_rows, to_host
    from nvila_jax.model import NVILAModel
    from nvila_jax.text.tiny_tokenizer import build_tiny_tokenizer

    assert (jax.process_count(), jax.device_count(), jax.local_device_count()) == (2, 8, 4)
    cfg, tok, key, image = mesh_test_config(), build_tiny_tokenizer(), jax.random.key(0), sample_image()
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    params = sharding.init_params_sharded(cfg, key, mesh)
    sharded_score = NVILAModel(cfg, params, tok, mesh=mesh).score(QUESTION, images=[image])
    gathered = jax.tree.map(to_host, params)  # the same values, whole, in each process
    single_score = NVILAModel(cfg, gathered, tok).score(QUESTION, images=[image])  # this process's first device

    # Each process reads only its rows; a program over the global batch sees all of them.
    full = np.arange(GLOBAL_ROWS * 3, dtype=np.int32).reshape(GLOBAL_ROWS, 3)
    rows = local_rows(sharding.batch_sharding(mesh, full.shape), full.shape)
    batch = global_batch({"x": full[rows]}, mesh, GLOBAL_ROWS)
    doubled = to_host(jax.jit(lambda x: x * 2)(batch["x"]))
    print(json.dumps({"process": jax.process_index(), "rows": [rows.start, rows.stop]}), flush=True)
    if is_primary():
        np.savez(os.path.join(out, f"results-{jax.process_index()}.npz"), sharded_score=sharded_score,
                 single_score=single_score, doubled=doubled, full=full)
    jax.distributed.shutdown()


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("multiprocess"))
    port = _free_port()
    procs = []
    for pid in range(2):
        env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
                   NVILA_NUM_PROCESSES="2", NVILA_PROCESS_ID=str(pid), JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                   NVILA_CPU_COLLECTIVES="gloo")
        procs.append(subprocess.Popen([sys.executable, os.path.join(HERE, "test_multiprocess.py"), "--out", out],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=600))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for pid, (p, (stdout, stderr)) in enumerate(zip(procs, outputs)):
        if p.returncode:
            pytest.fail(f"process {pid} failed ({p.returncode}):\n{stdout[-3000:]}\n{stderr[-6000:]}")
    reports = [json.loads(next(line for line in stdout.splitlines() if line.startswith("{"))) for stdout, _ in outputs]
    return dict(np.load(os.path.join(out, "results-0.npz"))), reports, os.listdir(out)


def test_two_process_sharded_score_equals_one_device(two_processes):
    arrays, _, _ = two_processes
    assert arrays["sharded_score"].shape == arrays["single_score"].shape
    np.testing.assert_allclose(arrays["sharded_score"], arrays["single_score"], atol=TOL, rtol=0)


def test_each_process_loads_its_own_rows_of_the_global_batch(two_processes):
    arrays, reports, _ = two_processes
    rows = {r["process"]: r["rows"] for r in reports}
    assert rows == {0: [0, GLOBAL_ROWS // 2], 1: [GLOBAL_ROWS // 2, GLOBAL_ROWS]}  # data axis spans processes
    np.testing.assert_array_equal(arrays["doubled"], 2 * arrays["full"])


def test_only_the_primary_process_writes(two_processes):
    assert two_processes[2] == ["results-0.npz"]


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    _worker(parser.parse_args().out)
