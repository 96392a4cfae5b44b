"""Throughput of the eval runner: samples/s with batched generation vs one request at a time, same model,
same samples (a synthetic short-answer task on images of a few sizes, written to a temporary directory).

    python benchmarks/eval_throughput.py                      # the tiny random model (CPU is fine)
    python benchmarks/eval_throughput.py --llm-hidden 2048 --llm-layers 16 --dtype bfloat16 --samples 128
    python benchmarks/eval_throughput.py --model CKPT_DIR --samples 256 --batch-size 16 --max-new-tokens 16

Each configuration first runs once untimed (compiles every program shape it needs), then the timed run
starts from an empty results directory. Prints samples/s for both and their ratio.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time

import jax
import PIL.Image

from nvila_jax.eval import evaluate_model, make_task

SIZES = ((640, 480), (480, 640), (800, 800))
QUESTIONS = ("What color is the picture?", "Is there a red square in the image?", "How many shapes are there?")


def write_task(root: str, samples: int) -> str:
    os.makedirs(os.path.join(root, "imgs"), exist_ok=True)
    rows = []
    for i in range(samples):
        name = f"imgs/{i}.png"
        PIL.Image.new("RGB", SIZES[i % len(SIZES)], (37 * i % 256, 91 * i % 256, 53 * i % 256)).save(
            os.path.join(root, name))
        rows.append({"id": i, "question": QUESTIONS[i % len(QUESTIONS)], "image": name, "answer": "red"})
    with open(os.path.join(root, "bench.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return "bench.jsonl"


def load_model(args):
    if args.model:
        import nvila_jax

        return nvila_jax.load_pretrained(args.model)
    from nvila_jax.model import NVILAModel
    from nvila_jax.models.nvila import init_params
    from nvila_jax.text.tiny_tokenizer import build_tiny_tokenizer
    from nvila_jax.variants import get_variant

    cfg = get_variant(args.variant)
    if args.llm_hidden or args.llm_layers:  # a wider / deeper random LLM (head_dim 64), same tokenizer
        hidden = args.llm_hidden or cfg.llm.hidden_size
        llm = dataclasses.replace(cfg.llm, hidden_size=hidden, intermediate_size=4 * hidden, head_dim=64,
                                  num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 256),
                                  num_hidden_layers=args.llm_layers or cfg.llm.num_hidden_layers)
        cfg = dataclasses.replace(cfg, llm=llm, projector=dataclasses.replace(cfg.projector, hidden_size=hidden))
    return NVILAModel(cfg, init_params(cfg, jax.random.key(0)), build_tiny_tokenizer(),
                      dtype=jax.numpy.dtype(args.dtype))


def samples_per_second(model, data_root: str, spec: str, batch_size: int, work: str) -> float:
    task = make_task(spec)
    evaluate_model(model, [task], data_root=data_root, out=os.path.join(work, f"warmup{batch_size}"),
                   batch_size=batch_size, progress=False)
    start = time.perf_counter()
    results = evaluate_model(model, [task], data_root=data_root, out=os.path.join(work, f"timed{batch_size}"),
                             batch_size=batch_size, progress=False)
    seconds = time.perf_counter() - start
    return results[task.key]["counts"]["predicted"] / seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="converted checkpoint directory (default: a random --variant model)")
    p.add_argument("--variant", default="tiny", help="variant for the random model (tiny's tokenizer)")
    p.add_argument("--llm-hidden", type=int, help="random model: LLM width (multiple of 256)")
    p.add_argument("--llm-layers", type=int, help="random model: LLM layers")
    p.add_argument("--dtype", default="float32", help="random model: parameter/compute dtype")
    p.add_argument("--samples", type=int, default=48)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=8)
    args = p.parse_args()
    model = load_model(args)
    with tempfile.TemporaryDirectory() as work:
        data_root = os.path.join(work, "data")
        spec = f"jsonl[file={write_task(data_root, args.samples)},max_new_tokens={args.max_new_tokens}]"
        single = samples_per_second(model, data_root, spec, 1, work)
        batched = samples_per_second(model, data_root, spec, args.batch_size, work)
    device = jax.devices()[0]
    llm = model.config.llm
    print(f"model {model.config.name} (LLM {llm.num_hidden_layers} x {llm.hidden_size}), {args.samples} image "
          f"questions, {args.max_new_tokens} new tokens, {jax.device_count()} x {device.device_kind}")
    print(f"batch size 1: {single:.2f} samples/s")
    print(f"batch size {args.batch_size}: {batched:.2f} samples/s")
    print(f"ratio (batched / batch size 1): {batched / single:.2f}x")


if __name__ == "__main__":
    main()
