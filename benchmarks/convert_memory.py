"""Peak memory and throughput of `nvila-jax convert` on a generated multi-GB official checkpoint.

    python benchmarks/convert_memory.py [--llm-layers 8] [--workdir /tmp/nvila_convert_bench] [--keep]

Writes a synthetic bfloat16 checkpoint in the official layout (the real SigLIP-so400m tower, the real
151,651-row vocabulary, a Qwen2 LLM of 2048 width; about 3.4 GB with 8 layers, LLM shards up to 2 GB), then
runs in fresh subprocesses, each measured with os.wait4 (peak resident set, wall time):
  reference   a plain safetensors read of every tensor (safetensors.safe_open, framework "pt")
  copy        `cp -r` of the checkpoint: reading and writing the same bytes, what bounds a converter on disk
  orbax       Orbax StandardCheckpointer.save of the same tensors held in memory (timed: the save only),
              the speed of the writer the converter streams into
  convert     `nvila-jax convert SRC DST` (default bfloat16): validation, sha256 of every file, streaming
              conversion into Orbax, extras, tokenizer, manifest
  baseline    `import jax, orbax.checkpoint` alone (the converter's fixed cost)
and prints peak RSS against the checkpoint size and largest tensor, and MB/s of each (ratios: convert against
the read and against the copy). Both files are deleted afterwards unless --keep. Needs torch (the test extra) for the
reference read of bfloat16 tensors.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

from checkpoints_convert.safetensors_io import StreamingWriter
from nvila_jax.config import NVILAConfig, ProjectorConfig, Qwen2Config, SiglipConfig
from nvila_jax.text.tiny_tokenizer import build_tiny_tokenizer
from checkpoints_convert.key_table import official_keys, official_shape, resolve
from checkpoints_convert.validate import _param_shapes

SHARD_BYTES = 2 * 1024**3

READ_ALL = """
import sys, glob
from safetensors import safe_open
n = 0
for path in sorted(glob.glob(sys.argv[1] + "/**/*.safetensors", recursive=True)):
    with safe_open(path, "pt") as f:
        for k in f.keys():
            n += f.get_tensor(k).numel()
print(n)
"""

# Orbax's own speed on this disk: every tensor read into memory, then one StandardCheckpointer.save (timed).
ORBAX_SAVE = """
import sys, glob, time
import ml_dtypes, torch
import orbax.checkpoint as ocp
from safetensors import safe_open
tree = {}
for path in sorted(glob.glob(sys.argv[1] + "/**/*.safetensors", recursive=True)):
    with safe_open(path, "pt") as f:
        for k in f.keys():
            tree[f"{path}:{k}".replace("/", "|").replace(".", "_")] = f.get_tensor(k).view(torch.int16).numpy().view(
                ml_dtypes.bfloat16)
start = time.perf_counter()
with ocp.StandardCheckpointer() as c:
    c.save(sys.argv[2], tree)
print(time.perf_counter() - start)
"""


def bench_config(llm_layers: int) -> NVILAConfig:
    llm = Qwen2Config(vocab_size=151651, hidden_size=2048, intermediate_size=11008, num_hidden_layers=llm_layers,
                      num_attention_heads=16, num_key_value_heads=2, head_dim=128, eos_token_id=386)
    vision = SiglipConfig()
    return NVILAConfig(vision=vision, llm=llm, projector=ProjectorConfig("mlp_downsample", 3 * vision.hidden_size,
                                                                         llm.hidden_size))


def _values(shape: tuple[int, ...], rng: np.random.Generator):
    """bfloat16 values of moderate size from random mantissas and signs (cheap to generate, incompressible)."""
    import ml_dtypes

    bits = rng.integers(0, 1 << 16, size=shape, dtype=np.uint16) & np.uint16(0x807F) | np.uint16(0x3C00)
    return bits.view(ml_dtypes.bfloat16)


def write_checkpoint(cfg: NVILAConfig, root: str) -> tuple[int, int]:
    """The official layout of `cfg` with random bfloat16 tensors; returns (bytes, largest tensor bytes)."""
    shapes = _param_shapes(cfg)
    rng = np.random.default_rng(0)
    entries: dict[str, list[tuple[str, str, tuple[int, ...]]]] = {}
    for component, key in official_keys(cfg):
        rule, layer = resolve(cfg, component, key)
        if rule.path[0] == "unused":
            shape = (cfg.vision.hidden_size,)
        else:
            shape = shapes[rule.path]
            shape = official_shape(rule.transform, shape[1:] if layer is not None else shape)
        entries.setdefault(component, []).append((key, "BF16", tuple(shape)))
    total = largest = 0
    for component, items in entries.items():
        os.makedirs(os.path.join(root, component), exist_ok=True)
        groups, size = [[]], 0
        for e in sorted(items):
            n = int(np.prod(e[2])) * 2
            if groups[-1] and size + n > SHARD_BYTES:
                groups, size = groups + [[]], 0
            groups[-1].append(e)
            size += n
        weight_map = {}
        for i, group in enumerate(groups):
            name = "model.safetensors" if len(groups) == 1 else f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
            with StreamingWriter(os.path.join(root, component, name), group, {"format": "pt"}) as w:
                for key, _, shape in group:
                    w.write(key, _values(shape, rng))
                    total += int(np.prod(shape)) * 2
                    largest = max(largest, int(np.prod(shape)) * 2)
                    weight_map[key] = name
        if len(groups) > 1:
            _json(os.path.join(root, component, "model.safetensors.index.json"),
                  {"metadata": {"total_size": sum(int(np.prod(s)) * 2 for _, _, s in items)}, "weight_map": weight_map})
    hf = cfg.to_hf_config()
    for name, obj in (("config.json", hf["config.json"]), ("llm/config.json", hf["llm"]),
                      ("vision_tower/config.json", hf["vision_tower"]), ("mm_projector/config.json", hf["mm_projector"])):
        _json(os.path.join(root, name), obj)
    build_tiny_tokenizer().save(os.path.join(root, "llm"))
    return total, largest


# Runs a command and reports its peak RSS. Linux counts the RSS a child had before exec (a copy of its
# parent) in ru_maxrss, so the command is started from this small, fresh interpreter, not from the benchmark.
MEASURE = """
import json, os, subprocess, sys, time
start = time.perf_counter()
proc = subprocess.Popen(sys.argv[1:], stdout=subprocess.PIPE, text=True)
out = proc.stdout.read()
_, status, usage = os.wait4(proc.pid, 0)
print(json.dumps([time.perf_counter() - start, usage.ru_maxrss / 1024, os.waitstatus_to_exitcode(status), out]))
"""


def measure(cmd: list[str]) -> tuple[float, float, int, str]:
    """(wall seconds, peak RSS in MB, exit code, stdout) of a command."""
    out = subprocess.run([sys.executable, "-c", MEASURE, *cmd], check=True, capture_output=True, text=True).stdout
    return tuple(json.loads(out.strip().splitlines()[-1]))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--llm-layers", type=int, default=8)
    p.add_argument("--workdir", default="/tmp/nvila_convert_bench")
    p.add_argument("--keep", action="store_true", help="keep the generated and converted checkpoints")
    args = p.parse_args()
    src, dst = os.path.join(args.workdir, "official"), os.path.join(args.workdir, "converted")
    shutil.rmtree(args.workdir, ignore_errors=True)
    try:
        t = time.perf_counter()
        total, largest = write_checkpoint(bench_config(args.llm_layers), src)
        print(f"generated {total / 1e9:.2f} GB checkpoint (largest tensor {largest / 1e6:.0f} MB) in "
              f"{time.perf_counter() - t:.0f}s")
        mb = total / 1e6
        base_s, base_rss, *_ = measure([sys.executable, "-c", "import jax, orbax.checkpoint"])
        read_s, read_rss, code, _ = measure([sys.executable, "-c", READ_ALL, src])
        assert code == 0, "the reference read failed"
        copy_s, copy_rss, code, _ = measure(["cp", "-r", src, dst + "-copy"])
        assert code == 0, "the copy failed"
        shutil.rmtree(dst + "-copy")
        _, orbax_rss, code, out = measure([sys.executable, "-c", ORBAX_SAVE, src, dst + "-orbax"])
        assert code == 0, "the Orbax save failed"
        orbax_s = float(out.strip().splitlines()[-1])
        shutil.rmtree(dst + "-orbax")
        conv_s, conv_rss, code, _ = measure([sys.executable, "-m", "nvila_jax", "convert", src, dst, "--quiet"])
        assert code == 0, "the conversion failed"
        print(f"reference  safetensors read   {read_s:6.1f}s {mb / read_s:7.0f} MB/s   peak RSS {read_rss:6.0f} MB")
        print(f"copy       cp -r (read+write) {copy_s:6.1f}s {mb / copy_s:7.0f} MB/s   peak RSS {copy_rss:6.0f} MB")
        print(f"orbax      in-memory save     {orbax_s:6.1f}s {mb / orbax_s:7.0f} MB/s   peak RSS {orbax_rss:6.0f} MB"
              " (whole checkpoint in memory; save only)")
        print(f"convert    nvila-jax convert  {conv_s:6.1f}s {mb / conv_s:7.0f} MB/s   peak RSS {conv_rss:6.0f} MB")
        print(f"baseline   import jax, orbax  {base_s:6.1f}s                 peak RSS {base_rss:6.0f} MB")
        print(f"ratio: convert throughput / safetensors read = {read_s / conv_s:.2f}, / copy = {copy_s / conv_s:.2f}, "
              f"/ Orbax in-memory save = {orbax_s / conv_s:.2f}; "
              f"converter peak RSS = "
              f"{conv_rss / (total / 2**20):.2f} x checkpoint size, {conv_rss / (largest / 2**20):.2f} x largest tensor")
    finally:
        if not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)
    return 0


def _json(path: str, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)


if __name__ == "__main__":
    sys.exit(main())
