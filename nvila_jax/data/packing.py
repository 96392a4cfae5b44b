"""Packing samples into fixed-shape batches, and the plan that turns a batch's tiles into visual tokens.

Rows: several samples per row of `seq_len` tokens, each with its own segment id (1, 2, ...; 0 = padding)
and positions restarting at 0, so attention never crosses samples; a sample's last target is IGNORE, so no
token predicts the next sample (the reference masks the first label of each packed sample).

Media, with static shapes (docs/training.md, "Fixed shapes"): all tiles of a micro-batch go through the
vision tower as one array of `tiles` (padded with blank tiles). Visual tokens are then formed per *block*
(one g x g feature map entering the projector), as the reference's split/merge does:
  - a Dynamic-S2 image contributes R x C blocks; block (r, c) takes, for every fixed scale k x k, the k x k
    tiles of that scale stitched and area-resized to the block's rows/cols (two small matrices), and the
    last-scale tile (r, c) itself; scales are concatenated on channels. This is one static program for every
    grid, so no recompilation per aspect ratio;
  - an independent tile (multi-image resize, NVILA-Lite tile, video frame) is one block (its feature map
    repeated on channels for Dynamic-S2 models, as `NVILA.tile_tokens`).
The projector runs on all blocks; `visual_index` points every visual position of the rows at its token in
[s2 block tokens | tile block tokens | TSP-pooled tokens]. Budgets follow from the tile count of the batch's
bucket, so a batch is fully described by (rows, seq_len, tiles).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from typing import Any, Sequence

import grain
import numpy as np

from nvila_jax.config import NVILAConfig
from nvila_jax.data.conversation import IGNORE
from nvila_jax.data.sample import SKIP_REASONS, Sample, Skipped
from nvila_jax.models.multiscale import area_resize_matrix

log = logging.getLogger(__name__)
LOGGED_SKIPS_PER_REASON = 5


@dataclasses.dataclass(frozen=True)
class VisualGeometry:
    """The static facts of a model that shape its visual tokens."""

    tiling: str
    tile_size: int
    grid: int  # patches per tile side (g)
    downsample: int  # k of the k x k space-to-channel
    scale_factors: tuple[int, ...]  # Dynamic-S2: tiles per side of each fixed (non-last) scale
    max_tiles: int
    pool_sizes: tuple[tuple[int, int, int], ...]  # TSP video pooling, () for the basic encoder

    @classmethod
    def from_config(cls, cfg: NVILAConfig) -> "VisualGeometry":
        s2 = cfg.tiling == "dynamic_s2"
        factors = tuple(s // cfg.s2_scales[0] for s in cfg.s2_scales[:-1]) if s2 else ()
        pools = cfg.video_encoder.pool_sizes if cfg.video_encoder.kind == "tsp" else ()
        return cls(cfg.tiling, cfg.vision.image_size, cfg.vision.grid_size, cfg.projector.downsample, factors,
                   cfg.max_tiles, tuple(tuple(p) for p in pools))

    @property
    def s2(self) -> bool:
        return self.tiling == "dynamic_s2"

    @property
    def block_side(self) -> int:
        return -(-self.grid // self.downsample)

    @property
    def tokens_per_block(self) -> int:
        return self.block_side ** 2

    @property
    def pool_group(self) -> int:
        """Tokens averaged into one pooled token (the largest pool size)."""
        return max((math.prod(p) for p in self.pool_sizes), default=0)

    def s2_blocks(self, tiles: int) -> int:
        """Merged-block budget for `tiles` tiles: an S2 image has at most max_tiles blocks per
        (fixed-scale tiles + max_tiles) tiles, so this never limits packing."""
        if not self.s2:
            return 0
        fixed = sum(k * k for k in self.scale_factors)
        return tiles * self.max_tiles // (fixed + self.max_tiles)

    def pooled(self, tiles: int) -> int:
        return tiles * self.tokens_per_block if self.pool_sizes else 0


@dataclasses.dataclass(frozen=True)
class BatchShape:
    """Static shape of one micro-batch."""

    rows: int
    seq_len: int
    tiles: int


@dataclasses.dataclass
class StepBatch:
    """What the pipeline yields per optimizer step: `arrays` with a leading [accumulation] axis (the device
    inputs), `sources` [n, 5] = (micro-batch, row, segment, dataset, record index) of every packed sample,
    `skipped` counts of records skipped (per SKIP_REASONS) since the previous step."""

    arrays: dict[str, np.ndarray]
    sources: np.ndarray
    skipped: np.ndarray

    @property
    def num_samples(self) -> int:
        return int(self.sources.shape[0])


def array_spec(geom: VisualGeometry, shape: BatchShape) -> dict[str, tuple[tuple[int, ...], Any]]:
    """name -> (shape, dtype) of one micro-batch's device arrays."""
    b, l, n = shape.rows, shape.seq_len, shape.tiles
    s, g = geom.tile_size, geom.grid
    spec: dict[str, tuple[tuple[int, ...], Any]] = {
        k: ((b, l), np.int32) for k in ("input_ids", "targets", "positions", "segment_ids", "visual_index")}
    spec["tiles"] = ((n, s, s, 3), np.uint8)
    spec["tile_src"] = ((n,), np.int32)
    nb = geom.s2_blocks(n)
    if geom.s2:
        for i, k in enumerate(geom.scale_factors):
            spec[f"s2_src_{i}"] = ((nb, k * k), np.int32)
            spec[f"s2_rows_{i}"] = ((nb, g, k * g), np.float32)
            spec[f"s2_cols_{i}"] = ((nb, g, k * g), np.float32)
        spec["s2_last"] = ((nb,), np.int32)
    if geom.pool_sizes:
        spec["pool_src"] = ((geom.pooled(n), geom.pool_group), np.int32)
        spec["pool_weight"] = ((geom.pooled(n), geom.pool_group), np.float32)
    return spec


@functools.lru_cache(maxsize=256)
def _area(n_in: int, n_out: int) -> np.ndarray:
    return area_resize_matrix(n_in, n_out)


class _Assembler:
    """Fills one micro-batch's arrays sample by sample."""

    def __init__(self, geom: VisualGeometry, shape: BatchShape, pad_id: int):
        self.geom, self.shape = geom, shape
        self.a = {k: np.zeros(s, d) for k, (s, d) in array_spec(geom, shape).items()}
        self.a["input_ids"][:] = pad_id
        self.a["targets"][:] = IGNORE
        self.a["visual_index"][:] = -1
        self.nb = geom.s2_blocks(shape.tiles)
        self.tile_base = self.nb * geom.tokens_per_block  # first token of the tile blocks
        self.pool_base = self.tile_base + shape.tiles * geom.tokens_per_block
        self.tiles = self.s2_block = self.tile_block = self.pooled = 0

    def add_row(self, row: int, samples: Sequence[Sample]) -> None:
        pos = 0
        for seg, sample in enumerate(samples, start=1):
            n = sample.length
            sl = slice(pos, pos + n)
            self.a["input_ids"][row, sl] = sample.input_ids
            self.a["targets"][row, sl] = sample.targets
            self.a["positions"][row, sl] = np.arange(n)
            self.a["segment_ids"][row, sl] = seg
            local = self._media(sample)
            vi = sample.visual_index
            self.a["visual_index"][row, sl] = np.where(vi >= 0, local[np.maximum(vi, 0)] if len(local) else -1, -1)
            pos += n

    def _media(self, sample: Sample) -> np.ndarray:
        """Places the sample's tiles and blocks; returns the batch token index of each of its visual tokens."""
        geom, tpb = self.geom, self.geom.tokens_per_block
        n_tiles = sample.num_tiles
        self.a["tiles"][self.tiles:self.tiles + n_tiles] = sample.tiles
        out, t = [], self.tiles
        for item in sample.media:
            if item.kind == "s2":
                out.append(self._s2_image(t, item.grid))
            else:
                blocks = np.arange(self.tile_block, self.tile_block + item.num_tiles)
                self.a["tile_src"][blocks] = t + np.arange(item.num_tiles)
                tokens = self.tile_base + blocks[:, None] * tpb + np.arange(tpb)  # [frames, tpb]
                self.tile_block += item.num_tiles
                out.append(self._pool(tokens) if item.kind == "video" and geom.pool_sizes else tokens.reshape(-1))
            t += item.num_tiles
        self.tiles = t
        return np.concatenate(out) if out else np.zeros(0, np.int64)

    def _s2_image(self, t0: int, grid: tuple[int, int]) -> np.ndarray:
        geom, g = self.geom, self.geom.grid
        rows, cols = grid
        b0 = self.s2_block
        offset = t0
        for i, k in enumerate(geom.scale_factors):
            src = offset + np.arange(k * k)
            ah, aw = _area(k * g, rows * g), _area(k * g, cols * g)
            for r in range(rows):
                for c in range(cols):
                    b = b0 + r * cols + c
                    self.a[f"s2_src_{i}"][b] = src
                    self.a[f"s2_rows_{i}"][b] = ah[r * g:(r + 1) * g]
                    self.a[f"s2_cols_{i}"][b] = aw[c * g:(c + 1) * g]
            offset += k * k
        self.a["s2_last"][b0:b0 + rows * cols] = offset + np.arange(rows * cols)
        self.s2_block += rows * cols
        # Token (y, x) of the merged token map comes from block (y // side, x // side), row-major inside it.
        side = geom.block_side
        y, x = np.meshgrid(np.arange(rows * side), np.arange(cols * side), indexing="ij")
        block = b0 + (y // side) * cols + x // side
        return (block * geom.tokens_per_block + (y % side) * side + x % side).reshape(-1)

    def _pool(self, frame_tokens: np.ndarray) -> np.ndarray:
        """TSP: per pool size (t, h, w) every pooled token averages a t x h x w group of frame tokens."""
        frames, tpb = frame_tokens.shape
        side = self.geom.block_side
        grid = frame_tokens.reshape(frames, side, side)
        k_max = self.geom.pool_group
        out = []
        for pt, ph, pw in self.geom.pool_sizes:
            groups = grid.reshape(frames // pt, pt, side // ph, ph, side // pw, pw).transpose(0, 2, 4, 1, 3, 5)
            groups = groups.reshape(-1, pt * ph * pw)
            n = len(groups)
            sl = slice(self.pooled, self.pooled + n)
            self.a["pool_src"][sl, :groups.shape[1]] = groups
            self.a["pool_weight"][sl, :groups.shape[1]] = 1.0 / groups.shape[1]
            self.a["pool_weight"][sl, groups.shape[1]:k_max] = 0.0
            out.append(self.pool_base + np.arange(self.pooled, self.pooled + n))
            self.pooled += n
        return np.concatenate(out)


def assemble(geom: VisualGeometry, shape: BatchShape, rows: Sequence[Sequence[Sample]], pad_id: int
             ) -> dict[str, np.ndarray]:
    """The device arrays of one micro-batch from its rows of samples."""
    if len(rows) > shape.rows:
        raise ValueError(f"{len(rows)} rows for a batch of {shape.rows}")
    asm = _Assembler(geom, shape, pad_id)
    for r, samples in enumerate(rows):
        if sum(s.length for s in samples) > shape.seq_len:
            raise ValueError(f"row {r} holds {sum(s.length for s in samples)} tokens; rows have {shape.seq_len}")
        asm.add_row(r, samples)
    if asm.tiles > shape.tiles:
        raise ValueError(f"{asm.tiles} tiles for a batch of {shape.tiles}")
    return asm.a


# ------------------------------------------------------------------------------------------ packing
@dataclasses.dataclass(frozen=True)
class PackingOptions:
    rows: int  # rows per micro-batch
    seq_len: int
    tile_buckets: tuple[int, ...]  # allowed tile counts per micro-batch (largest = budget)
    accumulation: int = 1  # micro-batches per step
    group_steps: int = 2  # steps packed together (first fit across their micro-batches)
    pad_id: int = 0

    @property
    def max_tiles(self) -> int:
        return max(self.tile_buckets)


class _OpenMicroBatch:
    def __init__(self, opts: PackingOptions):
        self.rows: list[list[Sample]] = [[] for _ in range(opts.rows)]
        self.used = [0] * opts.rows
        self.tiles = 0
        self.opts = opts

    def place(self, s: Sample) -> bool:
        if self.tiles + s.num_tiles > self.opts.max_tiles:
            return False
        for r, used in enumerate(self.used):
            if used + s.length <= self.opts.seq_len:
                self.rows[r].append(s)
                self.used[r] += s.length
                self.tiles += s.num_tiles
                return True
        return False


class PackIterDataset(grain.IterDataset):
    """Samples (or Skipped) -> StepBatch, first-fit over the micro-batches of `group_steps` steps.

    Checkpointable by replay, like grain's own packers: the state is the parent's state where the current
    group started plus how many steps of it were emitted; restoring re-reads and re-packs that group.
    """

    def __init__(self, parent: grain.IterDataset, geom: VisualGeometry, opts: PackingOptions):
        super().__init__(parent)
        self.geom, self.opts = geom, opts

    def __iter__(self) -> "PackIterator":
        return PackIterator(self._parent.__iter__(), self.geom, self.opts)

    def __str__(self) -> str:
        return f"PackIterDataset({self.opts})"


class PackIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, geom: VisualGeometry, opts: PackingOptions):
        super().__init__(parent)
        self.geom, self.opts = geom, opts
        self._group_state = parent.get_state()
        self._ready: list[StepBatch] = []
        self._emitted = 0
        self._pending: tuple[Sample, Any] | None = None  # (sample, parent state before reading it)
        self._exhausted = False
        self._logged: dict[str, int] = {}

    def get_state(self) -> dict[str, Any]:
        if self._emitted == len(self._ready) and self._ready:  # group done: the next one starts here
            next_start = self._pending[1] if self._pending else self._parent.get_state()
            return {"parent": next_start, "emitted": 0}
        return {"parent": self._group_state, "emitted": self._emitted}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._group_state = state["parent"]
        self._pending, self._ready, self._exhausted = None, [], False
        self._emitted = 0
        if state["emitted"]:
            self._build_group()
            self._emitted = state["emitted"]

    def __next__(self) -> StepBatch:
        if self._emitted == len(self._ready):
            if self._exhausted:
                raise StopIteration
            self._build_group()
            if not self._ready:
                raise StopIteration
        batch = self._ready[self._emitted]
        self._emitted += 1
        return batch

    def _build_group(self) -> None:
        opts = self.opts
        self._group_state = self._pending[1] if self._pending else self._parent.get_state()
        micro: list[_OpenMicroBatch] = []
        skipped = np.zeros(len(SKIP_REASONS), np.int64)
        limit = opts.group_steps * opts.accumulation
        while True:
            if self._pending:
                sample, before = self._pending
                self._pending = None
            else:
                before = self._parent.get_state()
                try:
                    sample = next(self._parent)
                except StopIteration:
                    self._exhausted = True
                    break
                if isinstance(sample, Skipped):
                    skipped[SKIP_REASONS.index(sample.reason)] += 1
                    self._log_skip(sample)
                    continue
                if sample.length > opts.seq_len or sample.num_tiles > opts.max_tiles:
                    skipped[SKIP_REASONS.index("too_long" if sample.length > opts.seq_len else "too_many_tiles")] += 1
                    continue
            if any(m.place(sample) for m in micro):
                continue
            if len(micro) == limit:
                self._pending = (sample, before)
                break
            micro.append(_OpenMicroBatch(opts))
            micro[-1].place(sample)
        self._ready, self._emitted = [], 0
        for i in range(0, len(micro), opts.accumulation):
            steps = micro[i:i + opts.accumulation]
            if len(steps) < opts.accumulation:  # end of data: pad the step with empty micro-batches
                steps += [_OpenMicroBatch(opts) for _ in range(opts.accumulation - len(steps))]
            self._ready.append(self._step(steps, skipped if i == 0 else np.zeros_like(skipped)))

    def _log_skip(self, s: Skipped) -> None:
        """The first few skipped records of each reason, with what was wrong (all are counted)."""
        seen = self._logged.get(s.reason, 0)
        if seen < LOGGED_SKIPS_PER_REASON:
            more = " (further ones are only counted)" if seen + 1 == LOGGED_SKIPS_PER_REASON else ""
            log.warning("skipped (%s) %s%s", s.reason, s.detail, more)
        self._logged[s.reason] = seen + 1

    def _step(self, micro: Sequence[_OpenMicroBatch], skipped: np.ndarray) -> StepBatch:
        need = max(m.tiles for m in micro)
        tiles = min(b for b in self.opts.tile_buckets if b >= need)
        shape = BatchShape(self.opts.rows, self.opts.seq_len, tiles)
        parts = [assemble(self.geom, shape, m.rows, self.opts.pad_id) for m in micro]
        arrays = {k: np.stack([p[k] for p in parts]) for k in parts[0]}
        sources = [(a, r, seg, s.dataset, s.index) for a, m in enumerate(micro) for r, row in enumerate(m.rows)
                   for seg, s in enumerate(row, start=1)]
        return StepBatch(arrays, np.asarray(sources, np.int64).reshape(-1, 5), skipped)
