"""The image benchmarks of NVILA's core suite (vila-eval tags core/local), with the standard harness metrics.

    nvila-jax eval --config configs/eval/image.py --model CKPT --data-root /data/benchmarks --out results/img
"""

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.tasks = "ai2d,chartqa,docvqa,infovqa,gqa,mme,mmmu,pope,textvqa,vqav2"
    config.batch_size = 8
    config.limit = config_dict.placeholder(int)
    config.num_frames = config_dict.placeholder(int)
    return config
