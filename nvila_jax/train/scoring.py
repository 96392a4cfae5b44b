"""Per-example losses of a model over a mixture (one ordered pass, packed batches): the input of DeltaLoss
pruning (`nvila-jax prune`)."""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from nvila_jax.config import NVILAConfig
from nvila_jax.data.mixture import Mixture
from nvila_jax.data.packing import PackingOptions, VisualGeometry
from nvila_jax.data.pipeline import build_pipeline
from nvila_jax.data.sample import SKIP_REASONS, SampleOptions, load_tokenizer
from nvila_jax.models.nvila import NVILA
from nvila_jax.train.step import micro_batch_nll


@dataclasses.dataclass
class ExampleLosses:
    """Mean next-token loss over the trained tokens of every scored example, per dataset of the mixture:
    {dataset index: {record index: loss}}; `skipped` counts records that could not be scored, per reason."""

    losses: dict[int, dict[int, float]]
    skipped: dict[str, int]


def load_model_dir(directory: str) -> tuple[NVILAConfig, Any, str]:
    """(config, params, tokenizer directory) of an nvila_jax model directory (`nvila-jax convert` output or
    a training run's model/)."""
    from nvila_jax.checkpoint import TOKENIZER_DIR, read_config, restore_params

    return read_config(directory), restore_params(directory), os.path.join(directory, TOKENIZER_DIR)


def example_losses(config: NVILAConfig, params: Any, tokenizer: str, mixture: Mixture, *, seq_len: int,
                   rows: int, tiles: int, dtype: Any = jnp.float32,
                   progress: Callable[[int], None] | None = None) -> ExampleLosses:
    """Scores every record of `mixture` (in file order, nothing dropped) with the model."""
    mixture = dataclasses.replace(mixture, datasets=tuple(dataclasses.replace(d, fraction=None)
                                                          for d in mixture.datasets))
    pad = load_tokenizer(tokenizer).pad_token_id
    packing = PackingOptions(rows=rows, seq_len=seq_len, tile_buckets=(tiles,), accumulation=1, group_steps=4,
                             pad_id=pad)
    options = SampleOptions(max_length=seq_len, max_tiles=tiles)
    pipeline = build_pipeline(mixture, config, tokenizer, options, packing, seed=0, shuffle=False, repeat=False)
    geom = VisualGeometry.from_config(config)
    module = NVILA(config, dtype=dtype)
    nll_fn = jax.jit(lambda p, micro: micro_batch_nll(module, p, micro, geom, loss_chunk=0))
    losses: dict[int, dict[int, float]] = {i: {} for i in range(len(mixture.datasets))}
    skipped = np.zeros(len(SKIP_REASONS), np.int64)
    for batch in pipeline:
        skipped += batch.skipped
        micro = {k: jnp.asarray(v[0]) for k, v in batch.arrays.items()}
        nll = np.asarray(nll_fn(params, micro), np.float64)
        seg, trained = batch.arrays["segment_ids"][0], batch.arrays["targets"][0] >= 0
        for _, row, segment, dataset, index in batch.sources:
            mask = (seg[row] == segment) & trained[row]
            losses[int(dataset)][int(index)] = float(nll[row][mask].sum() / max(mask.sum(), 1))
        if progress:
            progress(batch.num_samples)
    return ExampleLosses(losses, dict(zip(SKIP_REASONS, skipped.tolist())))


def delta_loss_drop_list(small: dict[int, float], large: dict[int, float], num_records: int,
                         keep_fraction: float) -> list[int]:
    """Record indices to drop: DeltaLoss keeps the `keep_fraction` of scored records with the largest
    loss(small) - loss(large) (learnable, not yet learned by the small model); records easy or impossible for
    both score near 0 and go, as do records that could not be scored."""
    if not 0 < keep_fraction <= 1:
        raise ValueError(f"keep fraction must be in (0, 1], got {keep_fraction}")
    scored = sorted(set(small) & set(large))
    delta = np.asarray([small[i] - large[i] for i in scored])
    keep_n = int(round(keep_fraction * len(scored)))
    order = np.argsort(-delta, kind="stable")
    kept = {scored[i] for i in order[:keep_n]}
    return [i for i in range(num_records) if i not in kept]
