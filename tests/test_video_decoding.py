"""Video files decoded with PyAV: exactly N frames at round(linspace(0, n - 1, N)), undecodable frames
replaced by the nearest decodable one with a warning, and a clear error for every unusable file."""

from __future__ import annotations

import os
import warnings

import numpy as np
import PIL.Image
import pytest

from helpers.video_files import break_mjpeg_frames, frame_level, write_video
from nvila_jax.media.image import MediaError
from nvila_jax.media.video import frame_indices, read_video_frames, sample_frames


@pytest.mark.parametrize("codec,ext", [("mjpeg", "avi"), ("mpeg4", "mp4"), ("libx264", "mp4"), ("libx264", "mkv")])
def test_frames_are_taken_at_rounded_linspace(tmp_path, codec, ext):
    path = write_video(str(tmp_path / f"v.{ext}"), 23, codec)  # h264 reorders frames (B-frames)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        frames = read_video_frames(path, 8)
    assert len(frames) == 8 and all(f.mode == "RGB" and f.size == (64, 48) for f in frames)
    assert [frame_level(f) for f in frames] == list(frame_indices(23, 8)) == [0, 3, 6, 9, 13, 16, 19, 22]


@pytest.mark.parametrize("count,n", [(5, 12), (1, 4), (9, 1), (30, 30)])
def test_short_videos_repeat_frames_and_counts_match(tmp_path, count, n):
    path = write_video(str(tmp_path / "v.avi"), count)
    assert [frame_level(f) for f in read_video_frames(path, n)] == list(frame_indices(count, n))


def test_undecodable_frames_are_replaced_by_the_nearest_decodable(tmp_path):
    path = write_video(str(tmp_path / "v.avi"), 20)
    break_mjpeg_frames(path, [5, 6, 7, 19])
    with pytest.warns(UserWarning, match=r"frame\(s\) \[5, 19\] of 20 could not be decoded.*\[4, 18\]"):
        frames = read_video_frames(path, 5)  # wants 0, 5, 10, 14, 19
    assert [frame_level(f) for f in frames] == [0, 4, 10, 14, 18]


def test_tie_goes_to_the_earlier_frame(tmp_path):
    path = write_video(str(tmp_path / "v.avi"), 9)
    break_mjpeg_frames(path, [4])
    with pytest.warns(UserWarning):
        frames = read_video_frames(path, 3)  # wants 0, 4, 8; 3 and 5 are equally near
    assert [frame_level(f) for f in frames] == [0, 3, 8]


def test_no_decodable_frame_is_an_error(tmp_path):
    path = write_video(str(tmp_path / "v.avi"), 4)
    break_mjpeg_frames(path, range(4))
    with pytest.raises(MediaError, match="none of its 4 frames could be decoded"):
        read_video_frames(path, 2)


def test_unusable_files_give_clear_errors(tmp_path):
    import av

    text = tmp_path / "notes.mp4"
    text.write_text("not a video")
    with pytest.raises(MediaError, match="notes.mp4: cannot be opened as a video"):
        sample_frames(str(text), 4)
    with pytest.raises(MediaError, match="missing.mp4: video not found"):
        sample_frames(str(tmp_path / "missing.mp4"), 4)
    audio = str(tmp_path / "tone.wav")
    with av.open(audio, "w") as c:
        s = c.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for p in s.encode(frame):
            c.mux(p)
    with pytest.raises(MediaError, match="tone.wav: the file has no video stream"):
        sample_frames(audio, 4)
    with pytest.raises(MediaError, match="num_frames must be >= 1"):
        sample_frames(write_video(str(tmp_path / "v.avi"), 3), 0)


def test_directories_and_frame_lists_still_work(tmp_path):
    for i in range(6):
        PIL.Image.new("RGB", (8, 8), (i * 8,) * 3).save(tmp_path / f"{i:03d}.png")
    got = sample_frames(str(tmp_path), 4)
    assert [os.path.basename(p) for p in got] == ["000.png", "002.png", "003.png", "005.png"]
    assert sample_frames(list("abcdef"), 3) == ["a", "c", "f"]
