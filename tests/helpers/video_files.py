"""Small video files written with PyAV for the tests: each frame is one flat gray level (8 * index), so a
decoded frame tells which index it is even after lossy coding; frames can be made undecodable."""

from __future__ import annotations

import re

import numpy as np

LEVEL_STEP = 8


def write_video(path: str, num_frames: int, codec: str = "mjpeg", size: tuple[int, int] = (64, 48),
                rate: int = 10) -> str:
    import av

    w, h = size
    with av.open(path, "w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height = w, h
        stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        for i in range(num_frames):
            img = np.full((h, w, 3), (i * LEVEL_STEP) % 256, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def frame_level(image) -> int:
    """The index a decoded frame of `write_video` shows."""
    return int(round(float(np.asarray(image).mean()) / LEVEL_STEP))


def break_mjpeg_frames(path: str, indices) -> None:
    """Zeroes the JPEG data of the given frames of an MJPEG file in place, so they fail to decode."""
    data = bytearray(open(path, "rb").read())
    starts = [m.start() for m in re.finditer(b"\xff\xd8\xff", bytes(data))]
    for i in indices:
        end = data.index(b"\xff\xd9", starts[i]) + 2
        data[starts[i]:end] = bytes(end - starts[i])
    with open(path, "wb") as f:
        f.write(bytes(data))
