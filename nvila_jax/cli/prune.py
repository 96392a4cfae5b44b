"""`nvila-jax prune`: DeltaLoss dataset pruning. Scores every record of a mixture with a small and a large
model and writes, per dataset, the drop list that the `name@fraction` mixture syntax reads:
OUT/<fraction>/<name>.json (JSON list of record indices), plus OUT/scores/<name>.jsonl with the losses."""

from __future__ import annotations

import argparse

COMMAND = "prune"
HELP = "DeltaLoss pruning: per-example losses of a small and a large model -> drop lists for name@fraction"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mixture", required=True, help="mixture YAML of the datasets to prune")
    p.add_argument("--small", required=True, help="the small model's directory (converted, or a run's model/)")
    p.add_argument("--large", required=True, help="the large model's directory")
    p.add_argument("--fraction", required=True, help="fraction of each dataset to keep, e.g. 0.5")
    p.add_argument("--out", required=True, help="the slice folder to write (mixture `slice_folder`)")
    p.add_argument("--seq-len", type=int, default=4096, help="packed row length (longer records are skipped)")
    p.add_argument("--rows", type=int, default=4, help="rows per batch")
    p.add_argument("--tiles", type=int, default=64, help="ViT tiles per batch")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))


def run(args: argparse.Namespace) -> int:
    import json
    import os
    import sys

    import jax.numpy as jnp
    from tqdm import tqdm

    from nvila_jax.data.mixture import drop_list_path, load_mixture
    from nvila_jax.data.records import RecordFile
    from nvila_jax.train.scoring import delta_loss_drop_list, example_losses, load_model_dir

    try:
        keep = float(args.fraction)
    except ValueError:
        print(f"nvila-jax prune: --fraction {args.fraction!r} is not a number", file=sys.stderr)
        return 2
    if not 0 < keep <= 1:
        print(f"nvila-jax prune: --fraction must be in (0, 1], got {keep}", file=sys.stderr)
        return 2
    mixture = load_mixture(args.mixture)
    sizes = [len(RecordFile(d.path)) for d in mixture.datasets]
    scores = {}
    for which, directory in (("small", args.small), ("large", args.large)):
        config, params, tokenizer = load_model_dir(directory)
        with tqdm(total=sum(sizes), desc=f"scoring with the {which} model", unit="rec") as bar:
            result = example_losses(config, params, tokenizer, mixture, seq_len=args.seq_len, rows=args.rows,
                                    tiles=args.tiles, dtype=jnp.dtype(args.dtype), progress=bar.update)
        scores[which] = result.losses
        skipped = {k: v for k, v in result.skipped.items() if v}
        print(f"{which} model: scored {sum(len(v) for v in result.losses.values())} records; "
              f"skipped {skipped or 'none'}")
    out = os.path.abspath(args.out)
    for i, (spec, n) in enumerate(zip(mixture.datasets, sizes)):
        small, large = scores["small"][i], scores["large"][i]
        dropped = delta_loss_drop_list(small, large, n, keep)
        path = drop_list_path(out, args.fraction, spec.name)
        _write_atomic(path, json.dumps(dropped))
        lines = [json.dumps({"index": k, "loss_small": small[k], "loss_large": large[k],
                             "delta": small[k] - large[k]}) for k in sorted(set(small) & set(large))]
        _write_atomic(os.path.join(out, "scores", f"{spec.name}.jsonl"), "".join(x + "\n" for x in lines))
        print(f"{spec.name}: keeping {n - len(dropped)} of {n} records; drop list {path}")
    return 0


def _write_atomic(path: str, text: str) -> None:
    import os

    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
