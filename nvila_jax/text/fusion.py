"""Fusing media into the token sequence: each media token is replaced by its embedding block.

The reference walks the ids in Python and pops encoder outputs from a deque per modality. Here the host
builds, with array operations, the expanded id sequence and for every position the index of its visual
token (or -1), so the device fuses with one gather and a select, at a length known before anything runs.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import numpy as np

from nvila_jax.media.layout import VISUAL


class FusionError(ValueError):
    """Media tokens and media items that do not match."""


@dataclasses.dataclass(frozen=True)
class FusedSequence:
    """input_ids [L]: text ids, with `pad_id` at visual positions; visual_index [L]: index of the visual token
    at each position in the request's visual tokens (media in prompt order), -1 for text."""

    input_ids: np.ndarray
    visual_index: np.ndarray
    media_order: tuple[tuple[int, int], ...] = ()  # (media token id, item index) in sequence order

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_visual(self) -> int:
        return int((self.visual_index >= 0).sum())


def fuse(
    ids: Sequence[int],
    templates: Mapping[int, Sequence[np.ndarray]],
    pad_id: int = 0,
) -> FusedSequence:
    """Replaces the k-th occurrence of each media token id with the k-th template of that id.

    templates: {media token id: [template per media item, in prompt order]}; every item must be used.
    """
    ids = np.asarray(ids, np.int32)
    media_ids = np.asarray(list(templates), np.int32)
    positions = np.flatnonzero(np.isin(ids, media_ids))
    for tid, items in templates.items():
        found = int((ids[positions] == tid).sum())
        if found != len(items):
            raise FusionError(f"the prompt has {found} media token(s) of id {tid} but {len(items)} media item(s)")
    cursor = {tid: 0 for tid in templates}
    pieces, order, prev = [], [], 0
    for pos in positions:
        tid = int(ids[pos])
        pieces += [ids[prev:pos], np.asarray(templates[tid][cursor[tid]], np.int32)]
        order.append((tid, cursor[tid]))
        cursor[tid] += 1
        prev = pos + 1
    pieces.append(ids[prev:])
    expanded = np.concatenate(pieces) if pieces else ids
    is_visual = expanded == VISUAL
    visual_index = np.where(is_visual, np.cumsum(is_visual) - 1, -1).astype(np.int32)
    return FusedSequence(np.where(is_visual, pad_id, expanded).astype(np.int32), visual_index, tuple(order))
