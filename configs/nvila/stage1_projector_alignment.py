"""Stage 1 of NVILA-8B: projector alignment (reference `scripts/NVILA/stage1_9tile.sh`).

Trains the projector only, LR 1e-3, no clipping, 8192-token rows. Starts from the pretrained LLM
(Qwen2.5-7B-Instruct) and SigLIP-so400m-448 with a fresh projector, assembled as an nvila_jax model directory
(`nvila-jax convert` of an NVILA-layout checkpoint; see docs/training.md, "Stages").

Global batch: 512 samples (here ~2-3 Dynamic-S2 image samples per 8192-token row: 64 devices x 4 micro-batches x 1 row).
Set data.accumulation for your device count. num_train_steps: one epoch of your mixture is about
records / samples per step; the value here is a placeholder to replace.

    nvila-jax train --config configs/nvila/stage1_projector_alignment.py --workdir runs/nvila-8b/stage1
"""

from nvila_jax.train.config import stage_config


def get_config():
    c = stage_config(
        model="NVILA-8B",
        init_from="runs/nvila-8b/init",
        trainable=('projector',),
        learning_rate=0.001,
        max_grad_norm=0.0,
        seq_len=8192,
        accumulation=4,
        tile_buckets=(16, 32, 48),
        mixture="data/nvila/stage1_alignment.yaml",
        num_train_steps=2000,
    )
    return c
