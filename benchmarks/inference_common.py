"""Shared pieces of the CPU inference benchmarks (vision_encoder, prefill, decode, scale_then_compress):
the machine's measured limits, timing, and one set of random weights loaded into both frameworks.

Both frameworks run in float32 with the same thread count, in the same process, on the same weights:
PyTorch models are HF transformers' SigLIP / Qwen2 (sdpa attention, what a user of the official code gets
on a CPU) plus the official NVILA code transcribed in tests/helpers/torch_nvila.py.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import sys
import tempfile
import time
from typing import Callable

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import torch  # noqa: E402

from nvila_jax.config import NVILAConfig, ProjectorConfig  # noqa: E402
from nvila_jax.variants import QWEN25_0P5B, SIGLIP_SO400M_448  # noqa: E402

THREADS = len(os.sched_getaffinity(0))
torch.set_num_threads(THREADS)


def timed(fn: Callable[[], object], repeats: int = 3, warmup: int = 1) -> tuple[float, float]:
    """(best, median) wall seconds of fn() over `repeats` runs after `warmup` runs (fn must block until
    its work is done)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times), statistics.median(times)


def decode_step_seconds(generate: Callable[[int], object], new: int) -> float:
    """Seconds per decode step of `generate(n)` (generates n tokens per row), one measurement: the time of
    `new` tokens minus the time of one (the prefill), over new - 1 steps. Nothing is warmed up: call
    generate(new) and generate(1) once before."""
    full, _ = timed(lambda: generate(new), 1, warmup=0)
    first, _ = timed(lambda: generate(1), 1, warmup=0)
    return (full - first) / (new - 1)


def decode_steps_per_s(generate: Callable[[int], object], new: int, repeats: int) -> float:
    """Decode steps per second of `generate(n)`: the fastest of `repeats` measurements (decode_step_seconds)."""
    return 1.0 / min(decode_step_seconds(generate, new) for _ in range(repeats))


@dataclasses.dataclass(frozen=True)
class MachineLimits:
    gemm_flops: dict[str, float]  # float32 GEMM rate of each library in the process, FLOP/s
    read_rates: dict[str, float]  # rate of reading a 1 GiB float32 array once, by each method, bytes/s
    fastest_gemm: Callable[[], object] = dataclasses.field(repr=False, compare=False)  # its GEMM_FLOPS, again
    fastest_read: Callable[[], object] = dataclasses.field(repr=False, compare=False)  # its read_bytes, again
    read_bytes: float  # what fastest_read reads

    @property
    def matmul_flops(self) -> float:
        """The peak the benchmarks report against: the fastest library's rate."""
        return max(self.gemm_flops.values())

    @property
    def read_bandwidth(self) -> float:
        """The memory bandwidth the benchmarks report against: the fastest method's read rate."""
        return max(self.read_rates.values())

    def peak_now(self, repeats: int = 2) -> float:
        """The fastest library's GEMM rate measured again now (best of `repeats`, no warm-up): the host is a
        shared VM whose speed drifts by 10-15% over minutes (359-410 GFLOP/s in three runs of one evening),
        more than the margins measured against it."""
        return GEMM_FLOPS / timed(self.fastest_gemm, repeats, warmup=0)[0]

    def bandwidth_now(self, repeats: int = 2) -> float:
        """The fastest method's read rate measured again now (best of `repeats`, no warm-up), bytes/s: the
        memory system is shared with the VM's neighbours (22-31 GB/s measured on different days)."""
        return self.read_bytes / timed(self.fastest_read, repeats, warmup=0)[0]

    def describe(self) -> str:
        def listed(rates: dict[str, float], digits: int) -> str:  # the fastest, then every rate in units of 1e9
            best = max(rates, key=rates.get)
            return f"{best}; " + ", ".join(f"{name} {rate / 1e9:.{digits}f}" for name, rate in rates.items())

        return (f"machine: {THREADS} threads; float32 matmul peak {self.matmul_flops / 1e9:.0f} GFLOP/s "
                f"({listed(self.gemm_flops, 0)} in a {GEMM_SIZE}^3 GEMM, GFLOP/s), memory read bandwidth "
                f"{self.read_bandwidth / 1e9:.1f} GB/s ({listed(self.read_rates, 1)} reading 1 GiB, GB/s)")


GEMM_SIZE = 4096
GEMM_FLOPS = 2.0 * GEMM_SIZE**3


def measure_machine(gib: float = 1.0) -> MachineLimits:
    """The limits the benchmarks report against, measured now: the best rate of a GEMM_SIZE^3 float32 GEMM by
    any library in the process (PyTorch's MKL, numpy's OpenBLAS, XLA's own GEMM, and nvila_jax's OpenBLAS
    kernel; a square GEMM is the fastest thing a CPU does), and the best rate of reading a large float32 array
    once (summed by PyTorch, XLA and numpy, and streamed by nvila_jax's decode kernel as a one-row product: the
    limit is what the fastest of them reaches, as for the GEMM)."""
    from nvila_jax.kernels import blas_matmul, rows_matmul

    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((GEMM_SIZE, GEMM_SIZE), dtype=np.float32) for _ in range(2))
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    ja, jb = jnp.asarray(a), jnp.asarray(b)
    mm = jax.jit(jnp.matmul)
    gemms = {"torch": lambda: torch.mm(ta, tb), "numpy": lambda: a @ b, "XLA": lambda: mm(ja, jb).block_until_ready()}
    if blas_matmul.available():
        kernel = jax.jit(blas_matmul.blas_matmul)
        gemms["nvila_jax OpenBLAS kernel"] = lambda: kernel(ja, jb).block_until_ready()
    times = {name: timed(gemm, repeats=5)[0] for name, gemm in gemms.items()}  # best of 5
    n = int(gib * 2**30) // 4
    big = rng.standard_normal(n, dtype=np.float32)
    tbig, jbig = torch.from_numpy(big), jnp.asarray(big)
    total = jax.jit(jnp.sum)
    readers = {"torch sum": lambda: tbig.sum(), "XLA sum": lambda: total(jbig).block_until_ready(),
               "numpy sum": lambda: big.sum()}
    if rows_matmul.available():  # the decode kernel streaming the array as a [K, 4096] weight for one row
        stream = jax.jit(rows_matmul.rows_matmul)
        x, w = jnp.ones((1, n // 4096), jnp.float32), jbig.reshape(-1, 4096)
        readers["nvila_jax rows kernel, 1 row"] = lambda: stream(x, w).block_until_ready()
    reads = {name: timed(read, repeats=5)[0] for name, read in readers.items()}
    return MachineLimits({name: GEMM_FLOPS / t for name, t in times.items()},
                         {name: 4.0 * n / t for name, t in reads.items()}, gemms[min(times, key=times.get)],
                         readers[min(reads, key=reads.get)], 4.0 * n)


@dataclasses.dataclass(frozen=True)
class Runs:
    """Wall seconds of each timed run of one workload (or of one decode step), and the machine's limit (GEMM
    peak, FLOP/s, or read bandwidth, bytes/s) measured just before each run."""

    seconds: list[float]
    limits: list[float]

    @property
    def best(self) -> float:
        return min(self.seconds)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    def limit_range(self) -> str:
        """The limits measured beside the runs, in units of 1e9 (GFLOP/s or GB/s)."""
        return f"{min(self.limits) / 1e9:.0f}-{max(self.limits) / 1e9:.0f}"

    def of_limit(self, work: float) -> str:
        """"best / median" over the runs of work / seconds / the limit measured beside that run (work: FLOPs, or
        bytes read)."""
        ratios = [work / t / limit for t, limit in zip(self.seconds, self.limits)]
        return f"{max(ratios):.0%} / {statistics.median(ratios):.0%}"


def _runs_beside(limit_now: Callable[[], float], measures: dict[str, Callable[[], float]],
                 repeats: int) -> dict[str, Runs]:
    """Each measure() (seconds) taken `repeats` times, the workloads taking turns, each right after a fresh
    measurement of the machine's limit: a run's fraction of the limit then compares two things measured under
    the same load from the host's neighbours, and both frameworks see the same periods."""
    seconds: dict[str, list[float]] = {name: [] for name in measures}
    limits: dict[str, list[float]] = {name: [] for name in measures}
    for _ in range(repeats):
        for name, measure in measures.items():
            limits[name].append(limit_now())
            seconds[name].append(measure())
    return {name: Runs(seconds[name], limits[name]) for name in measures}


def timed_beside_peak(fns: dict[str, Callable[[], object]], limits: MachineLimits, repeats: int) -> dict[str, Runs]:
    """Each fn() timed `repeats` times beside the GEMM peak (limits.peak_now). Warm the fns up first."""
    return _runs_beside(limits.peak_now, {name: (lambda fn=fn: timed(fn, 1, warmup=0)[0]) for name, fn in fns.items()},
                        repeats)


def decode_beside_bandwidth(generates: dict[str, Callable[[int], object]], limits: MachineLimits, new: int,
                            repeats: int) -> dict[str, Runs]:
    """Seconds per decode step of each generate(n) (decode_step_seconds), measured `repeats` times beside the
    read bandwidth (limits.bandwidth_now). Warm up generate(new) and generate(1) first."""
    return _runs_beside(limits.bandwidth_now,
                        {name: (lambda g=g: decode_step_seconds(g, new)) for name, g in generates.items()}, repeats)


def bench_config(vision_layers: int = 27, llm_layers: int = 24, tiling: str = "dynamic_s2") -> NVILAConfig:
    """NVILA with SigLIP-So400m width (depth `vision_layers`) and a Qwen2.5-0.5B-shaped LLM (depth
    `llm_layers`); media token ids from the tiny tokenizer."""
    from nvila_jax.text.tiny_tokenizer import TINY_IDS

    vision = dataclasses.replace(SIGLIP_SO400M_448, num_hidden_layers=vision_layers)
    llm = dataclasses.replace(QWEN25_0P5B, num_hidden_layers=llm_layers)
    if tiling == "dynamic_s2":
        projector = ProjectorConfig("mlp_downsample", 3 * vision.hidden_size, llm.hidden_size)
        scales = (448, 896, 1344)
    else:
        projector = ProjectorConfig("mlp_downsample_3x3_fix", vision.hidden_size, llm.hidden_size)
        scales = (448,)
    return NVILAConfig(vision=vision, llm=llm, projector=projector, tiling=tiling, s2_scales=scales,
                       image_token_id=TINY_IDS["<image>"], video_token_id=TINY_IDS["<vila/video>"],
                       model_max_length=32768, name=f"bench-{tiling}")


def reference_and_params(cfg: NVILAConfig, seed: int = 0):
    """(TorchNVILA with HF's default initialisation and sdpa attention, the same weights as nvila_jax
    params in the inference layout of `NVILA(cfg, scan_layers=False)`, as NVILAModel holds them). HF's init
    (std 0.02) keeps a deep random model's activations finite."""
    from transformers import Qwen2ForCausalLM, SiglipVisionModel

    from checkpoints_convert.key_table import state_dicts_to_params
    from helpers.torch_nvila import TorchNVILA, TorchProjector, hf_llm_config, hf_vision_config
    from nvila_jax.models.qwen2 import unstack_layer_params
    from nvila_jax.text.tiny_tokenizer import build_tiny_tokenizer

    torch.manual_seed(seed)
    vis_cfg, llm_cfg = hf_vision_config(cfg), hf_llm_config(cfg)
    vis_cfg._attn_implementation = llm_cfg._attn_implementation = "sdpa"
    vision = SiglipVisionModel(vis_cfg).eval()
    llm = Qwen2ForCausalLM(llm_cfg).eval()
    projector = TorchProjector(cfg.projector.projector_type, cfg.projector.mm_hidden_size, cfg.llm.hidden_size).eval()
    tok_dir = tempfile.mkdtemp(prefix="nvila_bench_tok")
    build_tiny_tokenizer().save(tok_dir)
    ref = TorchNVILA(cfg, tok_dir, seed=seed, vision=vision, llm=llm, projector=projector)
    params, _ = state_dicts_to_params(cfg, ref.state_dicts())
    return ref, unstack_layer_params(jax.tree.map(jnp.asarray, params))


def setup(vision_layers: int, llm_layers: int) -> tuple[MachineLimits, NVILAConfig, object, object]:
    """(machine limits, printed; the benchmark config; its TorchNVILA reference and nvila_jax params)."""
    limits = measure_machine()
    print(limits.describe(), flush=True)
    cfg = bench_config(vision_layers=vision_layers, llm_layers=llm_layers)
    ref, params = reference_and_params(cfg)
    return limits, cfg, ref, params


def report(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)
