"""Stage 3 of NVILA-Lite-8B: pretraining of projector and LLM (reference `pretrain.sh`).

Trains the projector and the LLM, LR 5e-5. Initialised from stage 2's run.

Global batch: 1024 samples (64 devices x 4 micro-batches x 1 row of 4096 tokens).
Set data.accumulation for your device count. num_train_steps: one epoch of your mixture is about
records / samples per step; the value here is a placeholder to replace.

    nvila-jax train --config configs/nvila_lite/stage3_pretrain.py --workdir runs/nvila-lite-8b/stage3
"""

from nvila_jax.train.config import stage_config


def get_config():
    c = stage_config(
        model="NVILA-Lite-8B",
        init_from="runs/nvila-lite-8b/stage2",
        trainable=('projector', 'llm'),
        learning_rate=5e-05,
        max_grad_norm=0.0,
        seq_len=4096,
        accumulation=4,
        tile_buckets=(16, 32, 48),
        mixture="data/nvila_lite/pretrain.yaml",
        num_train_steps=8000,
    )
    return c
