"""Stage 4 of NVILA-Lite-8B: instruction tuning (reference `sft.sh`).

Trains everything, LR 2e-5. Initialised from stage 3's run.

Global batch: 2048 samples (64 devices x 8 micro-batches x 1 row of 4096 tokens).
Set data.accumulation for your device count. num_train_steps: one epoch of your mixture is about
records / samples per step; the value here is a placeholder to replace.

    nvila-jax train --config configs/nvila_lite/stage4_sft.py --workdir runs/nvila-lite-8b/stage4
"""

from nvila_jax.train.config import stage_config


def get_config():
    c = stage_config(
        model="NVILA-Lite-8B",
        init_from="runs/nvila-lite-8b/stage3",
        trainable=('vision_tower', 'projector', 'llm'),
        learning_rate=2e-05,
        max_grad_norm=0.0,
        seq_len=4096,
        accumulation=8,
        tile_buckets=(16, 32, 48),
        mixture="data/nvila_lite/sft.yaml",
        num_train_steps=8000,
    )
    return c
