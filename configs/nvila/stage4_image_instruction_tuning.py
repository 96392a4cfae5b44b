"""Stage 4 of NVILA-8B: image instruction tuning (reference `stage3_9tile.sh`).

Trains everything, LR 1.5e-5, gradient clipping 5.0. The reference's `--vflan_no_system_prompt` is a
per-dataset flag here: set `no_system_prompt: true` on the VFLAN entries of the mixture. Initialised from
stage 3's run.

Global batch: 1024 samples (64 devices x 8 micro-batches x 1 row of 8192 tokens).
Set data.accumulation for your device count. num_train_steps: one epoch of your mixture is about
records / samples per step; the value here is a placeholder to replace.

    nvila-jax train --config configs/nvila/stage4_image_instruction_tuning.py --workdir runs/nvila-8b/stage4
"""

from nvila_jax.train.config import stage_config


def get_config():
    c = stage_config(
        model="NVILA-8B",
        init_from="runs/nvila-8b/stage3",
        trainable=('vision_tower', 'projector', 'llm'),
        learning_rate=1.5e-05,
        max_grad_norm=5.0,
        seq_len=8192,
        accumulation=8,
        tile_buckets=(16, 32, 48),
        mixture="data/nvila/stage4_sft.yaml",
        num_train_steps=8000,
    )
    return c
