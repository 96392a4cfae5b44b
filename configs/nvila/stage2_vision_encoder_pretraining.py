"""Stage 2 of NVILA-8B: visual-encoder pretraining (reference `stage15_9tile.sh`, "stage 1.5").

Trains the vision tower and projector, LR 2e-5, gradient clipping 5.0. Initialised from stage 1's run.

Global batch: 1024 samples (64 devices x 8 micro-batches x 1 row of 8192 tokens).
Set data.accumulation for your device count. num_train_steps: one epoch of your mixture is about
records / samples per step; the value here is a placeholder to replace.

    nvila-jax train --config configs/nvila/stage2_vision_encoder_pretraining.py --workdir runs/nvila-8b/stage2
"""

from nvila_jax.train.config import stage_config


def get_config():
    c = stage_config(
        model="NVILA-8B",
        init_from="runs/nvila-8b/stage1",
        trainable=('vision_tower', 'projector'),
        learning_rate=2e-05,
        max_grad_norm=5.0,
        seq_len=8192,
        accumulation=8,
        tile_buckets=(16, 32, 48),
        mixture="data/nvila/stage2_vep.yaml",
        num_train_steps=4000,
    )
    return c
