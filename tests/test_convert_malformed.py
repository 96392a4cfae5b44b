"""Malformed official checkpoints: each gives one clear error naming every problem, before anything is
written, and leaves no destination (nor a partial directory) behind; so does killing the converter."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from checkpoints_convert.convert import convert
from checkpoints_convert.validate import CheckpointError
from helpers.official_checkpoint import write_official_checkpoint
from nvila_jax.cli import main
from nvila_jax.variants import tiny

PROJ = "mm_projector/model.safetensors"
VIT = "vision_tower/model.safetensors"


@pytest.fixture(scope="module")
def official(make_reference, tmp_path_factory):
    ref, _ = make_reference(tiny())
    return write_official_checkpoint(ref, tmp_path_factory.mktemp("malformed") / "official", shards=2)


@pytest.fixture
def ckpt(official, tmp_path):
    """A fresh copy of the valid checkpoint to break."""
    return shutil.copytree(official, tmp_path / "src")


def _edit_tensors(path, fn):
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def _edit_json(path, fn):
    with open(path) as f:
        obj = json.load(f)
    fn(obj)
    with open(path, "w") as f:
        json.dump(obj, f)


def _llm_shard_with(ckpt, key):
    index = json.load(open(ckpt / "llm" / "model.safetensors.index.json"))
    return ckpt / "llm" / index["weight_map"][key]


def missing_tensor(ckpt):
    key = "model.layers.1.mlp.up_proj.weight"
    _edit_tensors(_llm_shard_with(ckpt, key), lambda t: t.pop(key))
    _edit_json(ckpt / "llm" / "model.safetensors.index.json", lambda i: i["weight_map"].pop(key))


def extra_tensor(ckpt):
    _edit_tensors(ckpt / PROJ, lambda t: t.update({"layers.9.weight": np.zeros((4, 4), np.float32)}))


def wrong_shape(ckpt):
    _edit_tensors(ckpt / PROJ, lambda t: t.update({"layers.2.weight": np.ascontiguousarray(t["layers.2.weight"].T)}))


def truncated_file(ckpt):
    size = os.path.getsize(ckpt / VIT)
    with open(ckpt / VIT, "r+b") as f:
        f.truncate(size // 2)


def corrupt_index(ckpt):
    (ckpt / "llm" / "model.safetensors.index.json").write_text('{"weight_map": {"model.norm.weight": ')


def corrupt_header(ckpt):
    data = bytearray((ckpt / PROJ).read_bytes())
    data[8:16] = b"\x00garbage"
    (ckpt / PROJ).write_bytes(bytes(data))


def missing_config_field(ckpt):
    _edit_json(ckpt / "llm" / "config.json", lambda c: c.pop("hidden_size"))


def unknown_projector(ckpt):
    _edit_json(ckpt / "mm_projector" / "config.json", lambda c: c.update(mm_projector_type="mlp_magic"))


def vocab_mismatch(ckpt):
    _edit_json(ckpt / "llm" / "config.json", lambda c: c.update(vocab_size=500))


def bin_only(ckpt):
    os.remove(ckpt / PROJ)
    (ckpt / "mm_projector" / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")


def empty_directory(ckpt):
    shutil.rmtree(ckpt)
    os.makedirs(ckpt)


def unreadable_file(ckpt):
    if os.geteuid() == 0:  # root reads any file: make the path unreadable as a file instead
        os.remove(ckpt / VIT)
        os.makedirs(ckpt / VIT)
    else:
        os.chmod(ckpt / VIT, 0)


def integer_dtype(ckpt):
    _edit_tensors(ckpt / PROJ, lambda t: t.update({"layers.1.weight": t["layers.1.weight"].astype(np.int32)}))


def media_token_mismatch(ckpt):
    _edit_json(ckpt / "llm" / "added_tokens.json", lambda a: a.update({"<image>": 5}))


def missing_shard(ckpt):
    index = json.load(open(ckpt / "llm" / "model.safetensors.index.json"))
    os.remove(ckpt / "llm" / sorted(set(index["weight_map"].values()))[-1])


def missing_component(ckpt):
    shutil.rmtree(ckpt / "mm_projector")


def no_tokenizer(ckpt):
    for name in ("tokenizer.json", "vocab.json", "merges.txt"):
        os.remove(ckpt / "llm" / name)


# breakage -> phrases the error must contain (file or key named, and what was expected)
CASES = {
    missing_tensor: ["missing tensor llm/model.layers.1.mlp.up_proj.weight"],
    extra_tensor: [PROJ, "'layers.9.weight'", "unexpected"],
    wrong_shape: [PROJ, "'layers.2.weight'", "shape [384, 64], expected [64, 384]"],
    truncated_file: [VIT, "truncated"],
    corrupt_index: ["model.safetensors.index.json", "corrupt index", "not valid JSON"],
    corrupt_header: [PROJ, "not a safetensors file"],
    missing_config_field: ["llm config", "missing required field 'hidden_size'"],
    unknown_projector: ["unknown mm_projector_type 'mlp_magic'", "mlp_downsample"],
    vocab_mismatch: ["'model.embed_tokens.weight'", "vocab_size=500", "expected [500, 64]"],
    bin_only: ["mm_projector", "pytorch_model.bin", "safetensors", "never unpickles"],
    empty_directory: ["empty", "config.json + llm/ + vision_tower/ + mm_projector/"],
    unreadable_file: [VIT, "cannot be read"],
    integer_dtype: [PROJ, "'layers.1.weight'", "dtype I32", "floating-point"],
    media_token_mismatch: ["added_tokens.json", "'<image>' has id 5 but tokenizer.json gives 388"],
    missing_shard: ["model.safetensors.index.json", "which does not exist"],
    missing_component: ["mm_projector", "missing component directory"],
    no_tokenizer: ["no tokenizer.json and no merges.txt", "vocab.json"],
}


@pytest.mark.parametrize("breakage", list(CASES), ids=lambda f: f.__name__)
def test_malformed_checkpoint_names_the_problem_and_writes_nothing(breakage, ckpt, tmp_path):
    breakage(ckpt)
    dst = tmp_path / "out" / "converted"
    with pytest.raises(CheckpointError) as err:
        convert(str(ckpt), str(dst), progress=False)
    message = str(err.value)
    for phrase in CASES[breakage]:
        assert phrase in message, f"{phrase!r} not in:\n{message}"
    assert "nothing was written" in message
    if breakage in (bin_only, missing_component, truncated_file, missing_shard, unreadable_file):
        assert "missing tensor" not in message  # the unreadable tensors are that file's problem, named once
    assert not dst.parent.exists() or not os.listdir(dst.parent)


def test_every_problem_is_listed_in_one_error(ckpt, tmp_path):
    missing_tensor(ckpt)
    wrong_shape(ckpt)
    vocab_mismatch(ckpt)
    truncated_file(ckpt)
    with pytest.raises(CheckpointError) as err:
        convert(str(ckpt), str(tmp_path / "converted"), progress=False)
    assert len(err.value.problems) == 5, err.value.problems  # the vocabulary of embed_tokens and lm_head
    for phrases in (CASES[missing_tensor], CASES[wrong_shape], CASES[vocab_mismatch], CASES[truncated_file]):
        assert all(p in str(err.value) for p in phrases)


def test_unreadable_shard_is_reported_once_not_as_missing_tensors(ckpt, tmp_path):
    for breakage in (missing_shard, truncated_file):
        breakage(ckpt)
    with pytest.raises(CheckpointError) as err:
        convert(str(ckpt), str(tmp_path / "converted"), progress=False)
    assert len(err.value.problems) == 2 and "missing tensor" not in str(err.value)


def test_media_token_id_in_config_contradicting_the_tokenizer(make_reference, tmp_path):
    ref, _ = make_reference(tiny())
    src = write_official_checkpoint(ref, tmp_path / "official", layout="hf")
    _edit_json(os.path.join(src, "config.json"), lambda c: c.update(video_token_id=7))
    with pytest.raises(CheckpointError) as err:
        convert(src, str(tmp_path / "converted"), progress=False)
    assert err.value.problems == ["the config's video_token_id is 7 but the tokenizer's <vila/video> is 389"]
    assert not (tmp_path / "converted").exists()


def test_an_nvila_jax_checkpoint_is_not_converted_again(official, tmp_path):
    convert(str(official), str(tmp_path / "converted"), progress=False)
    with pytest.raises(CheckpointError, match="already an nvila_jax checkpoint; load it with "
                                              "nvila_jax.load_pretrained"):
        convert(str(tmp_path / "converted"), str(tmp_path / "again"), progress=False)
    assert not (tmp_path / "again").exists()


def test_load_pretrained_on_an_official_checkpoint_says_to_convert_it(official):
    import nvila_jax
    from nvila_jax.checkpoint import CheckpointFormatError

    with pytest.raises(CheckpointFormatError, match="missing params, tokenizer .*convert it first with `nvila-jax "
                                                    "convert SRC DST`"):
        nvila_jax.load_pretrained(official)


def test_existing_destination_needs_force(official, tmp_path, capsys):
    dst = tmp_path / "converted"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    assert main(["convert", str(official), str(dst), "--quiet"]) == 1
    assert "already exists; pass --force" in capsys.readouterr().err
    assert os.listdir(dst) == ["keep.txt"]
    assert main(["convert", str(official), str(dst), "--quiet", "--force"]) == 0
    assert not (dst / "keep.txt").exists() and (dst / "manifest.json").exists()
    assert sorted(os.listdir(tmp_path)) == ["converted"]
    # export follows the same rules
    assert main(["export", str(dst), str(tmp_path / "exported"), "--quiet"]) == 0
    assert (tmp_path / "exported" / "llm" / "model.safetensors.index.json").exists()
    assert main(["export", str(dst), str(tmp_path / "exported"), "--quiet"]) == 1
    assert "already exists; pass --force" in capsys.readouterr().err
    assert main(["export", str(dst), str(tmp_path / "exported"), "--quiet", "--force"]) == 0
    assert sorted(os.listdir(tmp_path)) == ["converted", "exported"]


def test_cli_reports_a_bad_checkpoint_without_traceback(ckpt, tmp_path, capsys):
    unknown_projector(ckpt)
    assert main(["convert", str(ckpt), str(tmp_path / "converted"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "mlp_magic" in err and "Traceback" not in err
    assert not (tmp_path / "converted").exists()


# A converter whose reads are slowed down, so that it can be killed while it writes.
SLOW_CONVERT = """
import sys, time
import checkpoints_convert.safetensors_io as io
read = io.TensorRef.read
io.TensorRef.read = lambda self, rows=None: (time.sleep(0.05), read(self, rows))[1]
from nvila_jax.cli import main
sys.exit(main(["convert", sys.argv[1], sys.argv[2], "--quiet"]))
"""


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_killing_the_converter_leaves_no_destination(sig, official, tmp_path):
    dst = tmp_path / "converted"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_CONVERT, str(official), str(dst)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and not _partial_params(tmp_path):
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.05)
    assert _partial_params(tmp_path), "the converter never started writing"
    time.sleep(0.3)
    proc.send_signal(sig)
    code = proc.wait(60)
    assert code == (-signal.SIGKILL if sig == signal.SIGKILL else 130)
    assert not dst.exists()
    if sig == signal.SIGTERM:
        assert os.listdir(tmp_path) == []  # cleaned up on the way out
    # a later run removes what a killed one left and completes
    convert(str(official), str(dst), progress=False)
    assert sorted(os.listdir(tmp_path)) == ["converted"]


def _partial_params(parent) -> bool:
    return any(n.startswith(".converted.partial-") and os.path.isdir(os.path.join(parent, n, "params"))
               for n in os.listdir(parent))
