"""The project's C++ CPU kernels (kernels/cpu/*.cc): compiled on first use, cached, registered with XLA.

Each source is compiled with the system's C++ compiler ($CXX, default g++) against jaxlib's XLA FFI headers,
once per source (and the shared headers beside it), jaxlib and compiler, into $NVILA_JAX_CACHE/kernels
(default ~/.cache/nvila_jax/kernels); the library is written to a temporary file and renamed, so concurrent
processes never load a half-written one. Without a compiler, without AVX-512, on another backend, or with
NVILA_JAX_CPU_KERNELS=0 in the environment (to compare against XLA alone) a kernel is reported unavailable
(logged once) and its caller uses XLA.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax

from nvila_jax.kernels.backend import log_once, platform

SOURCES = Path(__file__).parent / "cpu"


def cache_dir() -> Path:
    return Path(os.environ.get("NVILA_JAX_CACHE", Path.home() / ".cache" / "nvila_jax")) / "kernels"


def build(source: Path, flags: tuple[str, ...] = ()) -> Path:
    """The compiled library of `source` (extra compiler/linker `flags`, e.g. a library to link), built unless
    the cache holds it."""
    compiler = os.environ.get("CXX", "g++")
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler ({compiler!r}) on PATH")
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    inputs = source.read_bytes() + b"".join(h.read_bytes() for h in sorted(SOURCES.glob("*.h")))
    key = hashlib.sha256(inputs + "\0".join((jax.__version__, version, *flags)).encode()).hexdigest()[:16]
    library = cache_dir() / f"{source.stem}-{key}.so"
    if library.exists():
        return library
    library.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=library.parent)
    os.close(fd)
    cmd = [compiler, "-O3", "-std=c++17", "-fPIC", "-shared", "-w", f"-I{jax.ffi.include_dir()}", str(source),
           *flags, "-o", tmp]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode:
            raise RuntimeError(f"compiling {source.name} failed:\n{result.stderr[-2000:]}")
        os.replace(tmp, library)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return library


@functools.lru_cache(maxsize=None)
def register(name: str, handler: str, target: str, fallback: str, flags: tuple[str, ...] = ()) -> bool:
    """Compile kernels/cpu/`name`.cc (with `flags`) and register its `handler` symbol as the XLA FFI target
    `target`. True when it can run here: a CPU backend, a working compiler, a CPU the library supports (its
    `nvila_<name>_supported()`: AVX-512 for the hand-written kernels) and NVILA_JAX_CPU_KERNELS is not 0;
    otherwise logs once that `fallback` is used instead."""
    if platform() != "cpu":
        return False
    if os.environ.get("NVILA_JAX_CPU_KERNELS", "1") == "0":
        log_once(f"{name}: NVILA_JAX_CPU_KERNELS=0; using {fallback}")
        return False
    try:
        lib = ctypes.CDLL(str(build(SOURCES / f"{name}.cc", flags)))
    except (RuntimeError, OSError, subprocess.SubprocessError) as err:
        log_once(f"{name}: using {fallback} ({err})")
        return False
    if not getattr(lib, f"nvila_{name}_supported")():
        log_once(f"{name}: the CPU has no AVX-512; using {fallback}")
        return False
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, handler)), platform="cpu")
    log_once(f"{name}: CPU kernel registered as {target}")
    return True
