"""Static shapes for jit: lengths and counts rounded up to a small set of buckets, so that a new prompt
length, image size or batch size reuses an already compiled program instead of compiling a new one."""

from __future__ import annotations


def bucket(n: int, minimum: int = 16, steps_per_octave: int = 4) -> int:
    """The smallest bucket >= n. Buckets are `minimum * 2**k` split into `steps_per_octave` equal steps
    (16, 20, 24, 28, 32, 40, ... for the defaults), so padding wastes at most 1/steps_per_octave of the
    work while a few compiled shapes cover every length."""
    if n < 0:
        raise ValueError(f"cannot bucket a negative size {n}")
    if n <= minimum:
        return minimum
    octave = minimum
    while octave * 2 < n:
        octave *= 2
    step = max(1, octave // steps_per_octave)
    return -(-n // step) * step


def batch_bucket(n: int) -> int:
    """Batch sizes are padded to a power of two (1, 2, 4, 8, ...)."""
    if n < 1:
        raise ValueError(f"batch size must be >= 1, got {n}")
    return 1 << (n - 1).bit_length()


def power_of_two_chunks(n: int, max_chunk: int) -> list[int]:
    """Splits n items into chunks whose sizes are powers of two <= max_chunk, largest first (14 -> 8, 4, 2).

    Running the vision tower chunk by chunk wastes nothing on padding tiles and compiles at most
    log2(max_chunk) + 1 programs, whatever the tile count."""
    if max_chunk < 1 or max_chunk & (max_chunk - 1):
        raise ValueError(f"max_chunk must be a power of two, got {max_chunk}")
    chunks = [max_chunk] * (n // max_chunk)
    rest = n % max_chunk
    while rest:
        size = 1 << (rest.bit_length() - 1)
        chunks.append(size)
        rest -= size
    return chunks
