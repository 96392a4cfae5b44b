"""Video frame sampling: N frames at round(linspace(0, n - 1, N)), as the reference's release code.

Video files are decoded with PyAV. Unlike the reference (which silently returns fewer frames when some do
not decode, and then breaks temporal pooling), exactly N frames always come back: an undecodable frame is
replaced by the nearest decodable one, with a warning.
"""

from __future__ import annotations

import glob
import os
import warnings
from typing import Iterator, Sequence

import numpy as np
import PIL.Image

from nvila_jax.media.image import ImageLike, MediaError


def frame_indices(frame_count: int, num_frames: int) -> np.ndarray:
    """Indices of `num_frames` uniformly spread frames of a `frame_count`-frame video (repeats when short)."""
    if frame_count < 1:
        raise MediaError("the video has no frames")
    if num_frames < 1:
        raise MediaError(f"num_frames must be >= 1, got {num_frames}")
    return np.round(np.linspace(0, frame_count - 1, num_frames)).astype(int)


def sample_frames(video: str | os.PathLike | Sequence[ImageLike], num_frames: int) -> list[ImageLike]:
    """`num_frames` frames of a video given as a file, a directory of frame images or a list of frames."""
    if isinstance(video, (str, os.PathLike)):
        path = os.fspath(video)
        if os.path.isdir(path):
            frames = sorted(glob.glob(os.path.join(path, "*")))
        elif not os.path.exists(path):
            raise MediaError(f"{path}: video not found")
        else:
            return read_video_frames(path, num_frames)
    else:
        frames = list(video)
    return [frames[i] for i in frame_indices(len(frames), num_frames)]


# ---------------------------------------------------------------------------------------------- files
def _open(path: str):
    import av  # PyAV: imported on first use

    try:
        container = av.open(path)
    except FileNotFoundError:
        raise MediaError(f"{path}: video not found") from None
    except (av.error.FFmpegError, OSError) as e:
        raise MediaError(f"{path}: cannot be opened as a video ({e})") from None
    if not container.streams.video:
        container.close()
        raise MediaError(f"{path}: the file has no video stream")
    return container


def _frame_timestamps(path: str) -> list[int] | None:
    """Presentation timestamps of the video stream's frames, in presentation order (one per packet, no
    decoding), or None when the container does not time-stamp every packet."""
    import av

    with _open(path) as container:
        stream = container.streams.video[0]
        stamps = []
        try:
            for packet in container.demux(stream):
                if packet.size:
                    stamps.append(packet.pts)
        except av.error.FFmpegError:
            pass  # a damaged tail: the frames before it still count
    if not stamps or any(s is None for s in stamps):
        return None
    return sorted(stamps)


def _decoded_frames(path: str) -> Iterator[tuple[int | None, "av.VideoFrame"]]:
    """(pts, frame) of every frame that decodes; packets that fail to decode are skipped."""
    import av

    with _open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        packets = container.demux(stream)
        while True:
            try:
                packet = next(packets)
            except StopIteration:
                break
            except av.error.FFmpegError:
                break  # damaged container tail
            try:
                for frame in packet.decode():  # the final empty packet flushes the decoder
                    yield frame.pts, frame
            except av.error.FFmpegError:
                continue


def _collect(path: str, stamps: list[int] | None, wanted: set[int]) -> tuple[dict[int, PIL.Image.Image], set[int]]:
    """Decodes the whole stream once: RGB images of the `wanted` frame indices and the set of indices
    that decoded. Frames are indexed by presentation order (by decode order without timestamps)."""
    index_of = {s: i for i, s in enumerate(stamps)} if stamps is not None else None
    images, ok = {}, set()
    for n, (pts, frame) in enumerate(_decoded_frames(path)):
        i = n if index_of is None else index_of.get(pts)
        if i is None:
            continue
        ok.add(i)
        if i in wanted:
            images[i] = frame.to_image()
    return images, ok


def read_video_frames(path: str | os.PathLike, num_frames: int) -> list[PIL.Image.Image]:
    """Exactly `num_frames` RGB frames of a video file at round(linspace(0, n - 1, num_frames)).

    n counts the stream's frames (packets). A wanted frame that does not decode is replaced by the nearest
    decodable frame (the earlier one on a tie), with a warning; a video with no decodable frame is an error.
    """
    path = os.fspath(path)
    stamps = _frame_timestamps(path)
    count = len(stamps) if stamps is not None else sum(1 for _ in _decoded_frames(path))
    if count == 0:
        raise MediaError(f"{path}: the video stream has no frames")
    indices = [int(i) for i in frame_indices(count, num_frames)]
    images, ok = _collect(path, stamps, set(indices))
    if not ok:
        raise MediaError(f"{path}: none of its {count} frames could be decoded")
    missing = sorted({i for i in indices if i not in images})
    if missing:
        decodable = np.asarray(sorted(ok))
        nearest = {i: int(decodable[np.argmin(np.abs(decodable - i))]) for i in missing}
        warnings.warn(f"{path}: frame(s) {missing} of {count} could not be decoded; using the nearest decodable "
                      f"frame(s) {[nearest[i] for i in missing]} instead")
        extra, _ = _collect(path, stamps, set(nearest.values()))
        images.update({i: extra[nearest[i]] for i in missing})
    return [images[i] for i in indices]
