"""One training example, decoded and tokenised on the host: record -> media tiles + fused ids + targets.

Runs in the data workers. Everything that can be wrong with a record (bad JSON, empty conversation, missing
or corrupt media, too long after fusing media, nothing to train on) becomes a `Skipped` with a reason, so
the pipeline counts it and goes on; a healthy record becomes a `Sample`.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Sequence

import numpy as np

from nvila_jax.config import NVILAConfig
from nvila_jax.data.conversation import IGNORE, ConversationError, chat_messages, media_prefix, supervised_labels
from nvila_jax.data.mixture import DatasetSpec, RawExample
from nvila_jax.data.records import RecordError, parse_record
from nvila_jax.media.image import (ImageTiles, MediaError, dynamic_s2_tile_images, dynamic_tile_images, load_image,
                                   tile_pixels)
from nvila_jax.media.layout import EncoderTokens, image_template, video_template
from nvila_jax.media.video import sample_frames
from nvila_jax.text.fusion import FusionError, fuse
from nvila_jax.text.tokenizer import NVILATokenizer

SKIP_REASONS = ("invalid_record", "empty_conversation", "missing_media", "corrupt_media", "too_long",
                "too_many_tiles", "no_supervised_tokens")
IMAGE_POLICIES = ("all_images", "single_image")


@dataclasses.dataclass(frozen=True)
class MediaItem:
    """One media token's content: a Dynamic-S2 image ("s2", with its last-scale grid), one independent tile
    ("tile": a resized image or an NVILA-Lite tile) or a video ("video", one tile per frame)."""

    kind: str
    num_tiles: int
    grid: tuple[int, int] | None = None


@dataclasses.dataclass
class Sample:
    """input_ids / targets / visual_index [n]: the fused sequence; targets[t] is the label of token t + 1
    (IGNORE where untrained); visual_index indexes this sample's visual tokens in media order (-1 for text).
    tiles [t, S, S, 3] uint8, media items in sequence order."""

    input_ids: np.ndarray
    targets: np.ndarray
    visual_index: np.ndarray
    tiles: np.ndarray
    media: tuple[MediaItem, ...]
    dataset: int
    index: int

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_tiles(self) -> int:
        return int(self.tiles.shape[0])


@dataclasses.dataclass(frozen=True)
class Skipped:
    reason: str
    detail: str
    dataset: int
    index: int


class _Skip(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


@functools.lru_cache(maxsize=4)
def load_tokenizer(spec: str) -> NVILATokenizer:
    """"tiny" (the built-in tiny tokenizer) or a directory with tokenizer.json."""
    if spec == "tiny":
        from nvila_jax.text.tiny_tokenizer import build_tiny_tokenizer

        return build_tiny_tokenizer()
    return NVILATokenizer.from_dir(spec)


@dataclasses.dataclass(frozen=True)
class SampleOptions:
    """How records become samples. `image_policy`: "all_images" tiles every image of a sample with the
    model's dynamic tiling (Dynamic-S2 / Lite), as the reference's training does; "single_image" does so only
    for single-image samples and resizes each image of a multi-image sample to one tile, as its inference does."""

    max_length: int
    max_tiles: int
    image_policy: str = "all_images"
    num_video_frames: int | None = None

    def __post_init__(self) -> None:
        if self.image_policy not in IMAGE_POLICIES:
            raise ValueError(f"image_policy {self.image_policy!r}; expected one of {IMAGE_POLICIES}")


class SampleBuilder:
    """Picklable callable RawExample -> Sample | Skipped (the tokenizer is loaded lazily in each worker)."""

    def __init__(self, config: NVILAConfig, tokenizer: str, datasets: Sequence[DatasetSpec],
                 options: SampleOptions) -> None:
        if config.tiling == "dynamic_s2" and config.s2_resize_output_to_scale_idx % len(config.s2_scales) != \
                len(config.s2_scales) - 1:
            raise ValueError("training supports Dynamic-S2 merged at the last scale only "
                             f"(s2_resize_output_to_scale_idx=-1), got {config.s2_resize_output_to_scale_idx}")
        self.config = config
        self.tokenizer_spec = tokenizer
        self.datasets = tuple(datasets)
        self.options = options

    @property
    def tokenizer(self) -> NVILATokenizer:
        return load_tokenizer(self.tokenizer_spec)

    def __call__(self, example: RawExample) -> Sample | Skipped:
        try:
            return self._build(example)
        except _Skip as s:
            where = f"{self.datasets[example.dataset].path} record {example.index}"
            return Skipped(s.reason, f"{where}: {s}", example.dataset, example.index)

    # ------------------------------------------------------------------------------------------------
    def _build(self, example: RawExample) -> Sample:
        spec = self.datasets[example.dataset]
        if example.error is not None:
            raise _Skip("invalid_record", example.error)
        raw = example.raw
        if isinstance(raw, dict) and not raw.get("conversations"):
            raise _Skip("empty_conversation", "the record has no conversation turns")
        try:
            record = parse_record(raw)
        except RecordError as e:
            raise _Skip("invalid_record", str(e)) from None
        items, tiles = self._images(record.images, spec.media_dir)
        if record.video is not None:
            frames = self._video(os.path.join(spec.media_dir, record.video))
            items.append(MediaItem("video", len(frames)))
            tiles += frames
        cfg = self.config
        if len(tiles) > self.options.max_tiles:
            raise _Skip("too_many_tiles", f"{len(tiles)} tiles; the batch holds {self.options.max_tiles}")
        lite = cfg.tiling == "dynamic" and (self.options.image_policy == "all_images" or len(record.images) == 1)
        n_image_tokens = sum(1 for it in items if it.kind != "video")
        prefix = media_prefix(n_image_tokens, record.video is not None, newline_after_images=lite)
        tok = self.tokenizer
        try:
            messages = chat_messages(record.turns, prefix, spec.no_system_prompt)
        except ConversationError as e:
            raise _Skip("invalid_record", str(e)) from None
        ids, labels = supervised_labels(tok, messages)
        return self._fuse(ids, labels, items, tiles, example)

    def _images(self, paths: Sequence[str], media_dir: str) -> tuple[list[MediaItem], list[np.ndarray]]:
        cfg, size = self.config, self.config.vision.image_size
        tiled = self.options.image_policy == "all_images" or len(paths) == 1
        items, tiles = [], []
        for path in paths:
            img = self._load(os.path.join(media_dir, path))
            if cfg.tiling == "dynamic_s2" and tiled:
                pil, grid = dynamic_s2_tile_images(img, cfg.s2_scales, cfg.max_tiles)
                items.append(MediaItem("s2", len(pil), grid))
            elif cfg.tiling == "dynamic" and tiled:
                pil = dynamic_tile_images(img, size, cfg.min_tiles, cfg.max_tiles)
                items += [MediaItem("tile", 1)] * len(pil)
            else:
                pil = [img]
                items.append(MediaItem("tile", 1))
            tiles += [tile_pixels(t, size) for t in pil]
        return items, tiles

    def _video(self, path: str) -> list[np.ndarray]:
        if not os.path.exists(path):
            raise _Skip("missing_media", f"{path}: video not found")
        num = self.options.num_video_frames or self.config.num_video_frames
        try:
            frames = sample_frames(path, num)
            return [tile_pixels(load_image(f), self.config.vision.image_size) for f in frames]
        except MediaError as e:
            raise _Skip("corrupt_media", str(e)) from None

    @staticmethod
    def _load(path: str):
        if not os.path.isfile(path):
            raise _Skip("missing_media", f"{path}: image not found")
        try:
            return load_image(path)
        except MediaError as e:
            raise _Skip("corrupt_media", str(e)) from None

    def _fuse(self, ids: np.ndarray, labels: np.ndarray, items: list[MediaItem], tiles: list[np.ndarray],
              example: RawExample) -> Sample:
        cfg, tok = self.config, self.tokenizer
        img_enc = EncoderTokens.from_config(cfg.image_encoder, tok.encode)
        templates: dict[int, list[np.ndarray]] = {}
        images = [it for it in items if it.kind != "video"]
        if images:
            templates[cfg.image_token_id] = [
                image_template(cfg, ImageTiles(np.empty((it.num_tiles,)), it.grid), img_enc) for it in images]
        videos = [it for it in items if it.kind == "video"]
        if videos:
            vid_enc = EncoderTokens.from_config(cfg.video_encoder, tok.encode)
            templates[cfg.video_token_id] = [video_template(cfg, it.num_tiles, vid_enc) for it in videos]
        try:
            fused = fuse(ids, templates, pad_id=tok.pad_token_id)
        except FusionError as e:
            raise _Skip("invalid_record", str(e)) from None
        if fused.length > self.options.max_length:
            raise _Skip("too_long", f"{fused.length} tokens after fusing media; rows hold {self.options.max_length}")
        media_pos = np.isin(ids, list(templates))
        counts = np.ones(len(ids), np.int64)
        counts[media_pos] = [len(templates[tid][k]) for tid, k in fused.media_order]  # both in sequence order
        labels = np.where(media_pos, IGNORE, labels)
        fused_labels = np.repeat(labels, counts)
        targets = np.concatenate([fused_labels[1:], [IGNORE]]).astype(np.int32)
        if not (targets != IGNORE).any():
            raise _Skip("no_supervised_tokens", "no assistant tokens to train on (template did not match)")
        # Tiles and items in the order the media tokens appear in the sequence.
        by_kind = {cfg.image_token_id: [], cfg.video_token_id: []}
        start = 0
        for it in items:
            by_kind[cfg.video_token_id if it.kind == "video" else cfg.image_token_id].append(
                (it, tiles[start:start + it.num_tiles]))
            start += it.num_tiles
        ordered = [by_kind[tid][k] for tid, k in fused.media_order]
        tile_list = [t for _, ts in ordered for t in ts]
        size = cfg.vision.image_size
        pixels = np.stack(tile_list) if tile_list else np.zeros((0, size, size, 3), np.uint8)
        return Sample(fused.input_ids, targets, fused.visual_index, pixels, tuple(it for it, _ in ordered),
                      example.dataset, example.index)
