"""The grain pipeline: mixture -> global shuffle (one seed, every host) -> this process's shard -> decode,
tile and tokenise (worker processes) -> pack into fixed-shape steps -> prefetch to devices.

    records of each dataset, shuffled with the run's seed and repeated (reshuffled every epoch)
      -> mixed by weight -> [process_index::process_count] -> SampleBuilder (map)
      -> PackIterDataset (steps of accumulation x rows x seq_len) -> mp_prefetch (num_workers > 0)
      -> DevicePrefetch (a thread that keeps `prefetch` steps on device, each with its iterator state)
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Iterator

import grain

from nvila_jax.config import NVILAConfig
from nvila_jax.data.mixture import DatasetSource, Mixture, mixture_weights
from nvila_jax.data.packing import PackingOptions, PackIterDataset, StepBatch, VisualGeometry
from nvila_jax.data.sample import SampleBuilder, SampleOptions


def dataset_seed(seed: int, dataset: int) -> int:
    return (seed * 1_000_003 + dataset * 7919) % (2**31)


def mixture_dataset(mixture: Mixture, seed: int, shuffle: bool = True, repeat: bool = True) -> grain.MapDataset:
    """All datasets of a mixture as one MapDataset of RawExample: shuffled, repeated, mixed by weight."""
    sources = [DatasetSource(i, spec, mixture.slice_folder) for i, spec in enumerate(mixture.datasets)]
    parts = []
    for i, src in enumerate(sources):
        ds = grain.MapDataset.source(src)
        if shuffle:
            ds = ds.shuffle(seed=dataset_seed(seed, i))
        parts.append(ds.repeat() if repeat else ds)
    if len(parts) == 1:
        return parts[0]
    if not repeat:
        return grain.MapDataset.concatenate(parts)
    return grain.MapDataset.mix(parts, mixture_weights(mixture, [len(s) for s in sources]))


def build_pipeline(
    mixture: Mixture,
    model_config: NVILAConfig,
    tokenizer: str,
    sample_options: SampleOptions,
    packing: PackingOptions,
    *,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    num_workers: int = 0,
    read_threads: int = 1,
    shuffle: bool = True,
    repeat: bool = True,
) -> grain.IterDataset:
    """The training (or, with shuffle=repeat=False, one ordered pass's) pipeline yielding StepBatch."""
    ds = mixture_dataset(mixture, seed, shuffle, repeat)
    ds = ds[process_index::process_count]
    ds = ds.map(SampleBuilder(model_config, tokenizer, mixture.datasets, sample_options))
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=max(4, 2 * read_threads)))
    it = PackIterDataset(it, VisualGeometry.from_config(model_config), packing)
    if num_workers > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain's worker processes read absl flags; use their defaults
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=2))
    return it


class DevicePrefetch:
    """Iterates a grain iterator in a background thread, converting each StepBatch with `to_device`, and
    yields (device batch, host StepBatch, data state after that batch). The state travels with its batch, so
    a checkpoint saves exactly where the consumed batches end, however far the thread has read ahead."""

    _END = object()

    def __init__(self, iterator: grain.DatasetIterator, to_device: Callable[[StepBatch], Any], size: int = 2):
        self.iterator = iterator
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, size))
        self._stop = threading.Event()
        self._to_device = to_device
        self._thread = threading.Thread(target=self._run, name="device-prefetch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for batch in self.iterator:
                state = self.iterator.get_state()
                item = (self._to_device(batch), batch, state)
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
            self._queue.put(self._END)
        except BaseException as e:  # surfaced in the consumer
            self._queue.put(e)

    def __iter__(self) -> Iterator[tuple[Any, StepBatch, dict]]:
        return self

    def __next__(self) -> tuple[Any, StepBatch, dict]:
        item = self._queue.get()
        if item is self._END:
            self._queue.put(item)
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        close = getattr(self.iterator, "close", None)
        if close:
            close()
