"""Orbax checkpoints written and read one block at a time.

Orbax saves a tree whose leaves are in memory. The converter's leaves are `StreamedArray`s instead: a shape,
a dtype and a generator of (index, block) pairs that reads the official tensors lazily. A type handler
registered for them (in a private registry, nothing global) opens the same TensorStore array Orbax would
create for a numpy leaf, with one zarr chunk per block, and writes the blocks in turn, so only one block is
in memory. The leaves are recorded as numpy arrays: `ocp.PyTreeCheckpointer().restore` and restores into
sharded `jax.ShapeDtypeStruct` targets read them like any Orbax checkpoint.

`open_arrays` gives the saved arrays back as lazily read TensorStore handles (for export).
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Callable, Iterator, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from etils import epath
from orbax.checkpoint import future as ocp_future

Block = tuple[tuple[slice, ...], np.ndarray]
# Blocks written concurrently (compression and disk I/O overlap with reading the next block); memory grows by
# about one block per write in flight.
WRITES_IN_FLIGHT = 2


@dataclasses.dataclass(frozen=True)
class StreamedArray:
    """A parameter produced block by block: `blocks()` yields (index into the full array, block) pairs that
    tile it; every block but the last along an axis has `block_shape`."""

    shape: tuple[int, ...]
    dtype: np.dtype
    block_shape: tuple[int, ...]
    blocks: Callable[[], Iterator[Block]]


class _StreamingHandler(ocp.type_handlers.NumpyHandler):
    """Writes `StreamedArray` leaves sequentially, block by block, in Orbax's numpy-array format."""

    def __init__(self) -> None:
        super().__init__(deepcopy_host_arrays=False)

    async def _write_all(self, values: Sequence[StreamedArray], infos: Sequence[Any]) -> None:
        pending: collections.deque = collections.deque()  # writes in flight, oldest first
        for value, info in zip(values, infos):
            await info.await_path_creation()
            spec = ocp.type_handlers.get_json_tspec_write(
                info, use_ocdbt=info.is_ocdbt_checkpoint, global_shape=value.shape, local_shape=value.block_shape,
                dtype=np.dtype(value.dtype), process_index=jax.process_index() if info.is_ocdbt_checkpoint else None)
            array = await ts.open(ts.Spec(spec), create=True, open=True, context=info.ts_context)
            for index, block in value.blocks():
                pending.append(array[index].write(block))
                if len(pending) >= WRITES_IN_FLIGHT:
                    await pending.popleft()
        while pending:
            await pending.popleft()

    async def serialize(self, values, infos, args=None):  # type: ignore[override]
        return [ocp_future.CommitFutureAwaitingContractedSignals(self._write_all(values, infos),
                                                                 name="streamed_numpy")]


def save_streamed(directory: str, tree: Any) -> None:
    """Saves a tree of `StreamedArray` leaves as an Orbax PyTree checkpoint at `directory` (must not exist)."""
    # The jax.Array entry is unused; without one Orbax warns that it cannot persist array metadata.
    registry = ocp.type_handlers.create_type_handler_registry(
        (StreamedArray, _StreamingHandler()), (jax.Array, ocp.type_handlers.ArrayHandler()))
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(type_handler_registry=registry)) as checkpointer:
        checkpointer.save(directory, args=ocp.args.PyTreeSave(tree))


def open_arrays(directory: str) -> dict[tuple[str, ...], ts.TensorStore]:
    """{parameter path: TensorStore} of an Orbax PyTree checkpoint, opened without reading any data."""
    metadata = ocp.PyTreeCheckpointer().metadata(directory).item_metadata.tree
    use_ocdbt = ocp.type_handlers.is_ocdbt_checkpoint(epath.Path(directory))
    context = ocp.type_handlers.get_ts_context(use_ocdbt=use_ocdbt)
    out: dict[tuple[str, ...], ts.TensorStore] = {}
    for keypath, leaf in jax.tree_util.tree_flatten_with_path(metadata)[0]:
        path = tuple(str(k.key) for k in keypath)
        info = ocp.type_handlers.ParamInfo(name=leaf.name, parent_dir=epath.Path(directory),
                                           is_ocdbt_checkpoint=use_ocdbt)
        spec = ocp.type_handlers.get_json_tspec_read(info, use_ocdbt=use_ocdbt)
        out[path] = ts.open(ts.Spec(spec), open=True, context=context).result()
    return out
