"""The tiny NVILA on the synthetic shapes dataset: a complete small run on CPU (what `nvila-jax demo` trains).

    nvila-jax train --config configs/tiny.py --workdir /tmp/tiny [--config.num_train_steps=N --config.save_every=K]

The settings live in `nvila_jax.train.config.tiny_config` so the installed demo has them too.
"""

from nvila_jax.train.config import tiny_config


def get_config():
    return tiny_config()
