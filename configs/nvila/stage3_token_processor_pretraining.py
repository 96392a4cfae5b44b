"""Stage 3 of NVILA-8B: token-processor pretraining (reference `stage2_9tile.sh`).

Trains the projector and the LLM, LR 2e-5, no clipping. Initialised from stage 2's run.

Global batch: 1024 samples (64 devices x 8 micro-batches x 1 row of 8192 tokens).
Set data.accumulation for your device count. num_train_steps: one epoch of your mixture is about
records / samples per step; the value here is a placeholder to replace.

    nvila-jax train --config configs/nvila/stage3_token_processor_pretraining.py --workdir runs/nvila-8b/stage3
"""

from nvila_jax.train.config import stage_config


def get_config():
    c = stage_config(
        model="NVILA-8B",
        init_from="runs/nvila-8b/stage2",
        trainable=('projector', 'llm'),
        learning_rate=2e-05,
        max_grad_norm=0.0,
        seq_len=8192,
        accumulation=8,
        tile_buckets=(16, 32, 48),
        mixture="data/nvila/stage3_pretrain.yaml",
        num_train_steps=8000,
    )
    return c
