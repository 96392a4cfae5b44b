"""The streaming safetensors reader/writer against the safetensors library, and the streamed Orbax writer
against Orbax's own restore."""

from __future__ import annotations

import struct

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch
from safetensors.torch import load_file, save_file

from checkpoints_convert.orbax_stream import StreamedArray, open_arrays, save_streamed
from checkpoints_convert.safetensors_io import SafetensorsError, StreamingWriter, read_header
from nvila_jax.checkpoint import atomic_directory


@pytest.fixture
def tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(7, 5, generator=g),
        "b.bf16": torch.randn(3, 4, 2, generator=g).to(torch.bfloat16),
        "c.half": torch.randn(6, generator=g).to(torch.float16),
        "d.int": torch.arange(10, dtype=torch.int32).reshape(2, 5),
        "e.scalar": torch.tensor(3.5),
        "f.empty": torch.zeros(0, 4),
    }


def _np(t: torch.Tensor) -> np.ndarray:
    return t.float().numpy().astype(ml_dtypes.bfloat16) if t.dtype == torch.bfloat16 else t.numpy()


def test_reader_reads_what_safetensors_writes(tensors, tmp_path):
    path = str(tmp_path / "x.safetensors")
    save_file(tensors, path, metadata={"format": "pt"})
    header = read_header(path)
    assert header.metadata == {"format": "pt"} and sorted(header.tensors) == sorted(tensors)
    for key, t in tensors.items():
        ref = header.tensors[key]
        assert ref.shape == tuple(t.shape)
        np.testing.assert_array_equal(ref.read(), _np(t))
        if t.ndim and t.shape[0] > 2:  # blocks of rows
            np.testing.assert_array_equal(ref.read(slice(1, 3)), _np(t)[1:3])


def test_writer_output_is_byte_identical_to_the_library(tensors, tmp_path):
    path = str(tmp_path / "x.safetensors")
    save_file(tensors, path, metadata={"format": "pt"})
    header = read_header(path)
    out = str(tmp_path / "y.safetensors")
    with StreamingWriter(out, [(k, r.dtype, r.shape) for k, r in header.tensors.items()], header.metadata) as w:
        for key, ref in header.tensors.items():
            w.write(key, ref.read())
    assert open(out, "rb").read() == open(path, "rb").read()
    for k, v in load_file(out).items():
        assert torch.equal(v, tensors[k])


def test_writer_refuses_tensors_out_of_order_and_unfinished_files(tmp_path):
    w = StreamingWriter(str(tmp_path / "z.safetensors"), [("a", "F32", (2,)), ("b", "F32", (3,))])
    with pytest.raises(ValueError, match="expected a F32\\[2\\] next, got b"):
        w.write("b", np.zeros(3, np.float32))
    w.write("a", np.zeros(2, np.float32))
    with pytest.raises(ValueError, match="1 tensors were never written"):
        w.close()


@pytest.mark.parametrize("damage,message", [
    (lambda b: b[: len(b) - 9], "truncated"),
    (lambda b: b[:5], "too short to be a safetensors file"),
    (lambda b: struct.pack("<Q", 10**9) + b[8:], "header length 1000000000 exceeds the file"),
    (lambda b: b[:8] + b"[" + b[9:], "not valid JSON"),
    (lambda b: b.replace(b'"F32"', b'"Q64"', 1), "unsupported dtype 'Q64'"),
])
def test_reader_names_broken_files(tensors, tmp_path, damage, message):
    path = tmp_path / "x.safetensors"
    save_file({"a.weight": tensors["a.weight"]}, str(path))
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(SafetensorsError, match=message) as err:
        read_header(str(path))
    assert str(path) in str(err.value)


def test_streamed_orbax_arrays_restore_with_orbax(tmp_path):
    rng = np.random.RandomState(0)
    full = rng.randn(3, 5, 4).astype(np.float32)

    def layers():
        for i in range(3):
            yield (slice(i, i + 1), slice(None), slice(None)), full[i:i + 1]

    def rows():  # uneven last block
        for s in range(0, 5, 2):
            yield (slice(s, min(s + 2, 5)), slice(None)), full[0, s:s + 2].astype(ml_dtypes.bfloat16)

    tree = {"stacked": StreamedArray((3, 5, 4), np.dtype(np.float32), (1, 5, 4), layers),
            "nested": {"rows": StreamedArray((5, 4), np.dtype(ml_dtypes.bfloat16), (2, 4), rows)}}
    path = str(tmp_path / "params")
    save_streamed(path, tree)
    restored = ocp.PyTreeCheckpointer().restore(path)
    np.testing.assert_array_equal(restored["stacked"], full)
    np.testing.assert_array_equal(restored["nested"]["rows"], full[0].astype(ml_dtypes.bfloat16))
    target = {"stacked": jax.ShapeDtypeStruct((3, 5, 4), jnp.bfloat16, sharding=jax.sharding.SingleDeviceSharding(
        jax.devices()[0])), "nested": {"rows": jax.ShapeDtypeStruct((5, 4), jnp.float32, sharding=jax.sharding.
                                                                    SingleDeviceSharding(jax.devices()[0]))}}
    with ocp.StandardCheckpointer() as c:
        cast = c.restore(path, target)
    assert cast["stacked"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(cast["stacked"], np.float32), full.astype(ml_dtypes.bfloat16).astype(np.float32))
    arrays = open_arrays(path)
    assert sorted(arrays) == [("nested", "rows"), ("stacked",)]
    np.testing.assert_array_equal(arrays[("stacked",)][1].read().result(), full[1])


def test_atomic_directory_appears_only_when_complete(tmp_path):
    dst = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_directory(dst) as tmp:
            open(f"{tmp}/half", "w").write("x")
            raise RuntimeError("stop")
    assert list(tmp_path.iterdir()) == []
    with atomic_directory(dst) as tmp:
        open(f"{tmp}/done", "w").write("x")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (dst / "done").exists()
    with pytest.raises(FileExistsError, match="already exists"):
        with atomic_directory(dst):
            pass
    with atomic_directory(dst, overwrite=True) as tmp:
        open(f"{tmp}/new", "w").write("x")
    assert sorted(p.name for p in dst.iterdir()) == ["new"] and [p.name for p in tmp_path.iterdir()] == ["out"]
