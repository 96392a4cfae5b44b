"""Video benchmarks as NVILA reports them: Video-MME with and without subtitles over a sweep of frame counts
(vila-eval runs 8..512 frames; the long ones need a model with a long enough context), and EgoSchema.

    nvila-jax eval --config configs/eval/video.py --model CKPT --data-root /data/benchmarks --out results/vid
"""

import ml_collections
from ml_collections import config_dict

FRAMES = (8, 16, 32, 64, 128)


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.tasks = ",".join([f"videomme[frames={n}]" for n in FRAMES]
                            + [f"videomme_w_subtitle[frames={n}]" for n in FRAMES] + ["egoschema"])
    config.batch_size = 4
    config.limit = config_dict.placeholder(int)
    config.num_frames = config_dict.placeholder(int)
    return config
