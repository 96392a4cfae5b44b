"""The launch/ scripts: the single-host launcher really starts a multi-process JAX job (2 CPU processes);
the SLURM and TPU scripts build the documented commands (checked with a stand-in `srun` and DRY_RUN)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch")


def _run(script, args=(), env=None, timeout=300):
    full = dict(os.environ, **(env or {}))
    return subprocess.run(["bash", os.path.join(LAUNCH, script), *args], env=full, capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def test_single_host_launcher_starts_a_two_process_job(tmp_path):
    probe = ("from nvila_jax.distributed import initialize_from_env, is_primary; assert initialize_from_env(); "
             "import jax; print('process', jax.process_index(), jax.process_count(), jax.device_count(), is_primary())")
    proc = _run("single_host.sh", [sys.executable, "-c", probe],
                env={"NUM_PROCESSES": "2", "CPU_DEVICES": "2", "PORT": str(_free_port()), "LOG_DIR": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "process 0 2 4 True" in proc.stdout
    with open(tmp_path / "process_1.log") as f:
        assert "process 1 2 4 False" in f.read()


def test_single_host_launcher_returns_the_first_failure(tmp_path):
    proc = _run("single_host.sh", [sys.executable, "-c", "import os, sys; sys.exit(3 + int(os.environ['NVILA_PROCESS_ID']))"],
                env={"NUM_PROCESSES": "2", "LOG_DIR": str(tmp_path)})
    assert proc.returncode in (3, 4)
    assert _run("single_host.sh").returncode == 2  # no command: usage


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def fake_srun(tmp_path):
    """A `srun` that prints what it was asked to run and the variables the job would see."""
    path = tmp_path / "srun"
    path.write_text('#!/usr/bin/env bash\necho "srun $*"\necho "JAX_LOCAL_DEVICE_IDS=${JAX_LOCAL_DEVICE_IDS:-}"\n'
                    'echo "NVILA_DISTRIBUTED=${NVILA_DISTRIBUTED:-}"\n')
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return {"PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}", "CONFIG": "configs/tiny.py",
            "WORKDIR": "/shared/run dir", "SLURM_NTASKS": "16", "SLURM_JOB_NUM_NODES": "2", "SLURM_GPUS_ON_NODE": "8"}


def test_slurm_one_process_per_gpu(fake_srun):
    proc = _run("slurm_gpu.sbatch", ["--config.seed=3"], env={**fake_srun, "SLURM_NTASKS_PER_NODE": "8"})
    assert proc.returncode == 0, proc.stderr
    assert "JAX_LOCAL_DEVICE_IDS=\n" in proc.stdout  # JAX gives each process its SLURM_LOCALID GPU
    assert "NVILA_DISTRIBUTED=auto" in proc.stdout
    assert "--kill-on-bad-exit=1" in proc.stdout
    assert "nvila-jax train --config configs/tiny.py --workdir /shared/run\\ dir --config.seed=3" in proc.stdout


def test_slurm_one_process_per_node(fake_srun):
    proc = _run("slurm_gpu.sbatch", env={**fake_srun, "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "1",
                                         "VENV": "/opt/venv"})
    assert proc.returncode == 0, proc.stderr
    assert "JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7" in proc.stdout
    assert ". /opt/venv/bin/activate && exec nvila-jax train" in proc.stdout


def test_slurm_rejects_other_task_counts_and_missing_variables(fake_srun):
    proc = _run("slurm_gpu.sbatch", env={**fake_srun, "SLURM_NTASKS_PER_NODE": "4"})
    assert proc.returncode == 2 and "--ntasks-per-node must be 1" in proc.stderr
    env = {k: v for k, v in fake_srun.items() if k != "CONFIG"}
    proc = subprocess.run(["bash", os.path.join(LAUNCH, "slurm_gpu.sbatch")], capture_output=True, text=True,
                          env={k: v for k, v in os.environ.items() if k != "CONFIG"} | env)
    assert proc.returncode != 0 and "set CONFIG" in proc.stderr


def test_tpu_pod_commands():
    base = {"DRY_RUN": "1", "CONFIG": "configs/tiny.py", "WORKDIR": "gs://bucket/run"}
    proc = _run("tpu_pod.sh", ["--config.seed=3"], env={**base, "TPU_NAME": "pod", "ZONE": "us-east5-a",
                                                         "PROJECT": "p", "SETUP": "1"})
    assert proc.returncode == 0, proc.stderr
    setup, launch = proc.stdout.strip().splitlines()
    assert setup.startswith("gcloud compute tpus tpu-vm ssh pod --zone us-east5-a --worker=all --project p")
    assert "pip\\ install\\ -e\\ ." in setup
    assert "NVILA_DISTRIBUTED=on" in launch and "--config.seed=3" in launch and "gs://bucket/run" in launch
    proc = _run("tpu_pod.sh", env={**base, "LAUNCHER": "xpk", "CLUSTER": "c", "TPU_TYPE": "v5p-64",
                                   "DOCKER_IMAGE": "img", "WORKLOAD": "w"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("xpk workload create --cluster c --workload w --tpu-type v5p-64 --num-slices 1")
    assert _run("tpu_pod.sh", env={**base, "LAUNCHER": "ssh"}).returncode == 2
    assert _run("tpu_pod.sh", env={**base}).returncode != 0  # gcloud without TPU_NAME
