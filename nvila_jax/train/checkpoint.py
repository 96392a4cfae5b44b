"""Orbax checkpoints of a training run: parameters, optimizer state + step + RNG, the data iterator state
(one file per process) and run metadata, saved asynchronously every N steps and on preemption; the last K
are kept. A step directory appears only when complete (Orbax writes to a temporary path and renames), so a
run killed mid-save resumes from the previous checkpoint.
"""

from __future__ import annotations

import json
import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

ITEMS = ("params", "opt", "data", "meta")


class DataState:
    """The data iterator state of the last consumed batch, in the form grain's checkpoint handler saves
    (JSON bytes, one file per process)."""

    def __init__(self, state: Any = None):
        self.state = state

    def get_state(self) -> bytes:
        return json.dumps(self.state).encode()

    def set_state(self, state: bytes) -> None:
        self.state = json.loads(state)

    def start_prefetch(self) -> None:  # part of the handler's protocol
        pass


def _abstract(tree: Any) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)


class Checkpointer:
    def __init__(self, directory: str, save_every: int, keep: int, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=max(1, save_every),
            preservation_policy=ocp.checkpoint_managers.LatestN(max(1, keep)),
            enable_async_checkpointing=async_save,
            create=True,
            cleanup_tmp_directories=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, params: Any, opt: Any, data_state: Any, meta: dict, force: bool = False) -> bool:
        """Saves (asynchronously) when `step` is on the interval or `force`; returns whether it saved."""
        args = ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            opt=ocp.args.StandardSave(opt),
            data=grain.checkpoint.CheckpointSave(DataState(data_state)),
            meta=ocp.args.JsonSave(meta),
        )
        return self.manager.save(step, args=args, force=force)

    def restore(self, step: int, params_like: Any, opt_like: Any) -> tuple[Any, Any, Any, dict]:
        """(params, opt, data state, meta) of `step`; the `*_like` trees give shapes, dtypes and shardings."""
        data = DataState()
        out = self.manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(_abstract(params_like)),
            opt=ocp.args.StandardRestore(_abstract(opt_like)),
            data=grain.checkpoint.CheckpointRestore(data),
            meta=ocp.args.JsonRestore(),
        ))
        return out["params"], out["opt"], data.state, out["meta"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def restore_params(directory: str, params_like: Any, step: int | None = None) -> tuple[Any, int]:
    """Parameters of a training run's checkpoint (the latest unless `step`), e.g. the previous stage's output."""
    manager = ocp.CheckpointManager(os.path.abspath(directory), item_names=ITEMS,
                                    options=ocp.CheckpointManagerOptions(read_only=True))
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"{directory}: no training checkpoint found")
    out = manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(_abstract(params_like))))
    manager.close()
    return out["params"], step
