"""Building the C++ CPU kernels: one library per source in the cache, reused, nothing half-written left;
a missing compiler and a broken source are clear errors; the switch that turns them off."""

from __future__ import annotations

import os
import shutil

import pytest

from nvila_jax.kernels import blas_matmul, cpu_library

needs_compiler = pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None, reason="needs a C++ compiler")


@needs_compiler
@pytest.mark.parametrize("name", ["rows_matmul", "attention", "blas_matmul"])
def test_the_library_is_built_once_per_source_and_kept_in_the_cache(name, tmp_path, monkeypatch):
    monkeypatch.setenv("NVILA_JAX_CACHE", str(tmp_path))
    flags = blas_matmul._openblas_flags() if name == "blas_matmul" else ()
    if flags is None:
        pytest.skip("needs scipy-openblas32")
    first = cpu_library.build(cpu_library.SOURCES / f"{name}.cc", flags)
    assert first.parent == tmp_path / "kernels" and first.exists() and first.name.startswith(name)
    stamp = os.stat(first).st_mtime_ns
    assert cpu_library.build(cpu_library.SOURCES / f"{name}.cc", flags) == first
    assert os.stat(first).st_mtime_ns == stamp  # reused, not rebuilt
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no temporary file left behind


def test_the_kernels_can_be_switched_off_for_comparisons(monkeypatch):
    monkeypatch.setenv("NVILA_JAX_CPU_KERNELS", "0")
    cpu_library.register.cache_clear()
    try:
        assert not cpu_library.register("attention", "NvilaAttention", "nvila_attention", "XLA")
    finally:
        cpu_library.register.cache_clear()  # the next caller registers again (registration is idempotent)


def test_a_missing_compiler_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("NVILA_JAX_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "no-such-compiler")
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler \\('no-such-compiler'\\)"):
        cpu_library.build(cpu_library.SOURCES / "attention.cc")


@needs_compiler
def test_a_source_that_does_not_compile_is_a_clear_error_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("NVILA_JAX_CACHE", str(tmp_path / "cache"))
    broken = tmp_path / "broken.cc"
    broken.write_text("int main( {\n")
    with pytest.raises(RuntimeError, match="compiling broken.cc failed"):
        cpu_library.build(broken)
    assert list((tmp_path / "cache" / "kernels").iterdir()) == []
