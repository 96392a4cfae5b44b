"""Stage 2 of NVILA-Lite-8B: visual-encoder pretraining (reference `stage15.sh`).

Trains the vision tower and projector, LR 5e-5. Initialised from stage 1's run.

Global batch: 1024 samples (64 devices x 4 micro-batches x 1 row of 4096 tokens).
Set data.accumulation for your device count. num_train_steps: one epoch of your mixture is about
records / samples per step; the value here is a placeholder to replace.

    nvila-jax train --config configs/nvila_lite/stage2_vision_encoder.py --workdir runs/nvila-lite-8b/stage2
"""

from nvila_jax.train.config import stage_config


def get_config():
    c = stage_config(
        model="NVILA-Lite-8B",
        init_from="runs/nvila-lite-8b/stage1",
        trainable=('vision_tower', 'projector'),
        learning_rate=5e-05,
        max_grad_norm=0.0,
        seq_len=4096,
        accumulation=4,
        tile_buckets=(16, 32, 48),
        mixture="data/nvila_lite/stage15.yaml",
        num_train_steps=4000,
    )
    return c
