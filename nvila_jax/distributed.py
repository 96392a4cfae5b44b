"""Multi-process (multi-host) execution: start `jax.distributed` from the environment, decide which rows of
a global batch each process loads, assemble global arrays from process-local batches, and let only process
0 write logs and files.

Environment (read by `initialize_from_env`; the launch/ scripts set them):
  NVILA_DISTRIBUTED        auto (default) | on | off. `on` calls jax.distributed.initialize() with every
                           setting auto-detected (Cloud TPU pod slices); `auto` starts it only for the
                           variables below or a multi-task SLURM / Open MPI step.
  NVILA_NUM_PROCESSES      number of processes (explicit setup, e.g. several processes on one machine)
  NVILA_PROCESS_ID         this process's index, 0 .. NVILA_NUM_PROCESSES - 1
  JAX_COORDINATOR_ADDRESS  host:port of process 0 (read by JAX too)
  JAX_LOCAL_DEVICE_IDS     devices this process drives, e.g. 0,1,2,3 (read by JAX; for one process per
                           node under SLURM, where JAX otherwise gives each process one GPU)
  NVILA_CPU_COLLECTIVES    gloo | mpi: collectives between CPU processes (tests, CPU-only clusters)
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding

from nvila_jax.sharding import LOGICAL_AXIS_RULES, Rules, batch_sharding


class DistributedSetupError(RuntimeError):
    """The environment describes a multi-process job incompletely or inconsistently."""


def _env_int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except KeyError:
        raise DistributedSetupError(f"{name} is not set; it is needed with NVILA_NUM_PROCESSES") from None
    except ValueError:
        raise DistributedSetupError(f"{name}={env[name]!r} is not an integer") from None


def _cluster_processes(env: Mapping[str, str]) -> int:
    """Processes of the SLURM step / Open MPI job this process belongs to (1 outside one)."""
    if "SLURM_JOB_ID" in env and "SLURM_STEP_NODELIST" in env and "SLURM_NTASKS" in env:
        return int(env["SLURM_NTASKS"])
    if "OMPI_COMM_WORLD_SIZE" in env:
        return int(env["OMPI_COMM_WORLD_SIZE"])
    return 1


def initialize_from_env(environ: Mapping[str, str] | None = None) -> bool:
    """Starts jax.distributed when the environment describes a multi-process job (see the module docstring).

    Call it first thing, before any other JAX call. Returns True when JAX runs multi-process.
    """
    env = os.environ if environ is None else environ
    if jax.distributed.is_initialized():
        return True
    mode = env.get("NVILA_DISTRIBUTED", "auto").lower()
    if mode not in ("auto", "on", "off"):
        raise DistributedSetupError(f"NVILA_DISTRIBUTED={mode!r}; expected auto, on or off")
    if mode == "off":
        return False
    if env.get("NVILA_CPU_COLLECTIVES"):
        jax.config.update("jax_cpu_collectives_implementation", env["NVILA_CPU_COLLECTIVES"])
    if "NVILA_NUM_PROCESSES" in env:
        num = _env_int(env, "NVILA_NUM_PROCESSES")
        if num < 1:
            raise DistributedSetupError(f"NVILA_NUM_PROCESSES={num} must be at least 1")
        if num == 1 and mode == "auto":
            return False
        pid = _env_int(env, "NVILA_PROCESS_ID")
        if not 0 <= pid < num:
            raise DistributedSetupError(f"NVILA_PROCESS_ID={pid} is outside 0..{num - 1}")
        address = env.get("JAX_COORDINATOR_ADDRESS")
        if not address:
            raise DistributedSetupError("JAX_COORDINATOR_ADDRESS (host:port of process 0) is not set")
        jax.distributed.initialize(coordinator_address=address, num_processes=num, process_id=pid)
        return True
    if mode == "on" or _cluster_processes(env) > 1:
        jax.distributed.initialize()
        return True
    return False


def is_primary() -> bool:
    """True in the one process that writes logs, metrics and files (process 0)."""
    return jax.process_index() == 0


def local_rows(sharding: NamedSharding, global_shape: tuple[int, ...]) -> slice:
    """The rows (leading dimension) of a global array of `global_shape` that this process's devices hold:
    the part of the global batch this process loads. Rows split over no process-spanning axis are all local."""
    starts, stops = [], []
    for index in sharding.addressable_devices_indices_map(tuple(global_shape)).values():
        rows = index[0] if index else slice(None)
        start, stop, _ = rows.indices(global_shape[0])
        starts.append(start)
        stops.append(stop)
    lo, hi = min(starts), max(stops)
    covered = np.zeros(hi - lo, bool)
    for a, b in zip(starts, stops):
        covered[a - lo:b - lo] = True
    if not covered.all():
        raise ValueError(f"process {jax.process_index()} holds non-contiguous rows of a {global_shape} array "
                         f"under {sharding.spec}; order the mesh so that each process gets one block")
    return slice(lo, hi)


def global_batch(local_batch: Any, mesh: Mesh, global_batch_size: int, rules: Rules = LOGICAL_AXIS_RULES) -> Any:
    """Global arrays from this process's rows of every leaf [rows, ...] of `local_batch` (numpy arrays).

    Each process passes the rows `local_rows` names; the result is split over the batch axes of `mesh`.
    """

    def one(x):
        x = np.asarray(x)
        shape = (global_batch_size,) + x.shape[1:]
        sharding = batch_sharding(mesh, shape, rules)
        rows = local_rows(sharding, shape)
        if x.shape[0] != rows.stop - rows.start:
            raise ValueError(f"process {jax.process_index()} passed {x.shape[0]} rows but holds rows "
                             f"{rows.start}..{rows.stop - 1} of the global batch of {global_batch_size}")
        return jax.make_array_from_process_local_data(sharding, x, shape)

    return jax.tree.map(one, local_batch)


def to_host(x: jax.Array) -> np.ndarray:
    """The whole value of a (possibly multi-process) array as numpy, in every process."""
    if x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
