"""Video frame sampling: N frames at round(linspace(0, n - 1, N)), as the reference's release code."""

from __future__ import annotations

import glob
import os
from typing import Sequence

import numpy as np

from nvila_jax.media.image import ImageLike, MediaError


def frame_indices(frame_count: int, num_frames: int) -> np.ndarray:
    """Indices of `num_frames` uniformly spread frames of a `frame_count`-frame video (repeats when short)."""
    if frame_count < 1:
        raise MediaError("the video has no frames")
    if num_frames < 1:
        raise MediaError(f"num_frames must be >= 1, got {num_frames}")
    return np.round(np.linspace(0, frame_count - 1, num_frames)).astype(int)


def sample_frames(video: str | os.PathLike | Sequence[ImageLike], num_frames: int) -> list[ImageLike]:
    """`num_frames` frames of a video given as a list of frames or a directory of frame images."""
    if isinstance(video, (str, os.PathLike)):
        path = os.fspath(video)
        if os.path.isdir(path):
            frames = sorted(glob.glob(os.path.join(path, "*")))
        elif not os.path.exists(path):
            raise MediaError(f"{path}: video not found")
        else:
            raise MediaError(f"{path}: decoding video files is not available in this build; pass a list of frames "
                             "or a directory of frame images")
    else:
        frames = list(video)
    return [frames[i] for i in frame_indices(len(frames), num_frames)]
