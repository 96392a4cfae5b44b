"""Stage 5 of NVILA-8B-Video: video instruction tuning (reference `stage4.sh`).

Trains everything, LR 2e-5, 16384-token rows; the -Video variant: `mlp_downsample_2x2_fix` projector, TSP
temporal pooling (8, 1, 1) after the projector, 256 frames per video (32 pooled frames x 257 tokens).
The reference's 100 time tokens with a soft cross-entropy are not implemented (docs/training.md).
Initialised from stage 4's run (the projector types share their parameters).

Global batch: 2048 samples (64 devices x 16 micro-batches x 1 row of 16384 tokens, ~2 videos per row).
Set data.accumulation for your device count. num_train_steps: one epoch of your mixture is about
records / samples per step; the value here is a placeholder to replace.

    nvila-jax train --config configs/nvila/stage5_video_instruction_tuning.py --workdir runs/nvila-8b/stage5
"""

from nvila_jax.train.config import stage_config


def get_config():
    c = stage_config(
        model="NVILA-8B-Video",
        init_from="runs/nvila-8b/stage4",
        trainable=('vision_tower', 'projector', 'llm'),
        learning_rate=2e-05,
        max_grad_norm=0.0,
        seq_len=16384,
        accumulation=16,
        tile_buckets=(256, 512),
        mixture="data/nvila/stage5_video_sft.yaml",
        num_train_steps=4000,
    )
    c.data.num_video_frames = 256
    return c
