"""`nvila-jax generate` on a converted tiny checkpoint: the streamed answer equals the PyTorch reference's
greedy answer, the report has the request's real counts, and bad inputs print one clear error."""

from __future__ import annotations

import re

import pytest

import nvila_jax
from helpers.torch_nvila import random_image
from helpers.video_files import write_video
from nvila_jax.cli import main
from nvila_jax.media.video import read_video_frames

QUESTION = "What color is the circle?"


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    random_image(150, 100, 1).save(root / "wide.png")
    return str(root / "wide.png"), write_video(str(root / "clip.avi"), 20, size=(80, 60))


def test_streams_the_reference_answer_and_reports_counts(tiny_checkpoint, media, capsys):
    ref, path = tiny_checkpoint
    image, _ = media
    want_ids = ref.greedy(QUESTION, [random_image(150, 100, 1)], max_new_tokens=6)
    want = ref.tokenizer.decode(want_ids, skip_special_tokens=True).strip()
    assert main(["generate", "--model", path, "--prompt", QUESTION, "--image", image, "--max-new-tokens", "6"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == want and want
    m = re.search(r"prompt (\d+) tokens \((\d+) visual from (\d+) ViT tiles\) \| vision [\d.]+ s \| prefill [\d.]+ s "
                  r"\| (\d+) tokens, decode [\d.]+ tokens/s \| finished by (stop|length)", err)
    assert m, err
    req = nvila_jax.load_pretrained(path).prepare(QUESTION, [image])
    assert [int(g) for g in m.groups()[:4]] == [req.length, req.fused.num_visual, req.num_tiles, len(want_ids)]
    assert (req.num_tiles, req.fused.num_visual) == (17, 192)  # Dynamic-S2: 1 + 4 + 3x4 tiles, 12 blocks of 16


def test_quiet_prints_only_the_answer_for_a_video(tiny_checkpoint, media, capsys):
    ref, path = tiny_checkpoint
    _, video = media
    frames = read_video_frames(video, 4)
    want = ref.tokenizer.decode(ref.greedy(QUESTION, (), frames, max_new_tokens=5), skip_special_tokens=True).strip()
    assert main(["generate", "--model", path, "--prompt", QUESTION, "--video", video, "--num-frames", "4",
                 "--max-new-tokens", "5", "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert out == want + "\n" and "prefill" not in err


def test_bad_inputs_print_one_clear_error(tiny_checkpoint, tmp_path, capsys):
    _, path = tiny_checkpoint
    assert main(["generate", "--model", path, "--prompt", QUESTION, "--image", str(tmp_path / "none.png")]) == 1
    assert "none.png: image file not found" in capsys.readouterr().err
    assert main(["generate", "--model", str(tmp_path / "nothing"), "--prompt", QUESTION]) == 1
    assert "nothing" in capsys.readouterr().err
    assert main(["generate", "--model", path, "--prompt", QUESTION, "--top-p", "0"]) == 1
    assert "top_p must be in (0, 1]" in capsys.readouterr().err
