"""A request prepared on the host: media preprocessed, prompt tokenised and fused, length known up front."""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import numpy as np

from nvila_jax.config import NVILAConfig
from nvila_jax.media.image import ImageLike, ImageTiles, frames_to_pixels, preprocess_images
from nvila_jax.media.layout import EncoderTokens, image_template, video_template
from nvila_jax.media.video import sample_frames
from nvila_jax.text.fusion import FusedSequence, fuse
from nvila_jax.text.prompt import media_text, prompt_ids
from nvila_jax.text.tokenizer import NVILATokenizer

VideoLike = str | os.PathLike | Sequence[ImageLike]


class ContextLengthError(ValueError):
    """The fused sequence does not fit the model's context."""


@dataclasses.dataclass(frozen=True)
class Request:
    """Everything the device needs for one prompt. `images[i]` belongs to the i-th `<image>` token."""

    prompt_ids: np.ndarray
    fused: FusedSequence
    images: tuple[ImageTiles, ...]
    video: np.ndarray | None  # [T, S, S, 3]

    @property
    def length(self) -> int:
        return self.fused.length

    @property
    def num_tiles(self) -> int:
        """ViT tiles of the media: every scale's tiles of a Dynamic-S2 image, every video frame."""
        return sum(t.pixels.shape[0] for t in self.images) + (0 if self.video is None else len(self.video))


def prepare_request(
    config: NVILAConfig,
    tokenizer: NVILATokenizer,
    prompt: str,
    images: Sequence[ImageLike] = (),
    video: VideoLike | None = None,
    num_frames: int | None = None,
    max_length: int | None = None,
) -> Request:
    """Preprocesses media, builds the chat prompt and the fused sequence; checks it fits `max_length`
    (default: the model's context) before anything runs."""
    if isinstance(images, (str, os.PathLike)) or hasattr(images, "size"):
        images = [images]  # a single image passed bare
    tiles = tuple(preprocess_images(list(images), config)) if images else ()
    lite_tiled = config.tiling == "dynamic" and len(images) == 1
    frames = None
    if video is not None:
        frames = frames_to_pixels(sample_frames(video, num_frames or config.num_video_frames),
                                  config.vision.image_size)
    ids = prompt_ids(tokenizer, prompt, media_text(len(tiles), frames is not None, lite_tiled))
    img_tokens = EncoderTokens.from_config(config.image_encoder, tokenizer.encode)
    templates = {}
    if tiles:
        templates[config.image_token_id] = [image_template(config, t, img_tokens) for t in tiles]
    if frames is not None:
        vid_tokens = EncoderTokens.from_config(config.video_encoder, tokenizer.encode)
        templates[config.video_token_id] = [video_template(config, len(frames), vid_tokens)]
    fused = fuse(ids, templates, pad_id=tokenizer.pad_token_id)
    limit = max_length or config.model_max_length
    if fused.length > limit:
        raise ContextLengthError(
            f"the prompt is {fused.length} tokens after fusing media ({fused.num_visual} visual), which exceeds "
            f"the {limit}-token context by {fused.length - limit}; use fewer frames/tiles or a shorter prompt"
        )
    return Request(np.asarray(ids, np.int32), fused, tiles, frames)
