"""The tiny NVILA on the synthetic shapes dataset: a complete small run on CPU.

    nvila-jax train --config configs/tiny.py --workdir /tmp/tiny [--config.num_train_steps=N --config.save_every=K]

Also what `nvila-jax demo` trains. The model is the `tiny` variant (56 px tiles, 7 px patches, Dynamic-S2 at
56/112/168 px, 2x2 token compression, a 2-layer Qwen2) with a wider LLM, so that it can learn colours, shapes,
counts and positions in a few CPU minutes.
"""

from nvila_jax.train.config import base_config


def get_config():
    c = base_config()
    c.model = "tiny"
    c.tokenizer = "tiny"
    c.trainable = ("vision_tower", "projector", "llm")
    c.num_train_steps = 600
    c.learning_rate = 2e-3
    c.warmup_ratio = 0.05
    c.max_grad_norm = 1.0
    c.compute_dtype = "float32"

    c.data.mixture = "synthetic"
    c.data.synthetic_records = 3000
    c.data.rows_per_batch = 8
    c.data.seq_len = 256
    c.data.tile_buckets = (128,)
    c.data.group_steps = 2

    c.save_every = 100
    c.keep_checkpoints = 2
    c.log_every = 10
    return c
