"""A quick smoke run: the first 50 samples of a few image and video tasks (not comparable with published
numbers; use it to check a checkpoint and a data layout before a full run).

    nvila-jax eval --config configs/eval/quick.py --model CKPT --data-root /data/benchmarks --out /tmp/quick
"""

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.tasks = "textvqa,docvqa,ai2d,mme,videomme[frames=8]"
    config.batch_size = 8
    config.limit = 50
    config.num_frames = config_dict.placeholder(int)
    return config
