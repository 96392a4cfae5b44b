"""Stage 1 of NVILA-Lite-8B: projector alignment (reference `scripts/NVILA-Lite/align.sh`).

Trains the projector only, LR 1e-3, 4096-token rows, mixture llava_15_mix in the reference. NVILA-Lite tiles
every image dynamically (1..12 tiles + thumbnail, 121 tokens each) and compresses 3x3.

Global batch: 2048 samples (64 devices x 8 micro-batches x 1 row of 4096 tokens, ~4 samples per row).
Set data.accumulation for your device count. num_train_steps: one epoch of your mixture is about
records / samples per step; the value here is a placeholder to replace.

    nvila-jax train --config configs/nvila_lite/stage1_align.py --workdir runs/nvila-lite-8b/stage1
"""

from nvila_jax.train.config import stage_config


def get_config():
    c = stage_config(
        model="NVILA-Lite-8B",
        init_from="runs/nvila-lite-8b/init",
        trainable=('projector',),
        learning_rate=0.001,
        max_grad_norm=0.0,
        seq_len=4096,
        accumulation=8,
        tile_buckets=(16, 32, 48),
        mixture="data/nvila_lite/align.yaml",
        num_train_steps=2000,
    )
    return c
