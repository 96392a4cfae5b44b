"""Shared fixtures: the tiny tokenizer on disk and PyTorch references (built once per session)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from nvila_jax.text.tiny_tokenizer import build_tiny_tokenizer

    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def tokenizer_dir(tiny_tokenizer, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tiny_tokenizer"))
    tiny_tokenizer.save(path)
    return path


@pytest.fixture(scope="session")
def make_reference(tokenizer_dir):
    """make_reference(cfg, seed=0) -> (TorchNVILA, nvila_jax params) with the same weights; cached."""
    cache = {}

    def make(cfg, seed: int = 0):
        key = (cfg, seed)
        if key not in cache:
            from checkpoints_convert.key_table import state_dicts_to_params
            from helpers.torch_nvila import TorchNVILA

            ref = TorchNVILA(cfg, tokenizer_dir, seed=seed)
            params, _ = state_dicts_to_params(cfg, ref.state_dicts())
            cache[key] = (ref, params)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_checkpoint(make_reference, tmp_path_factory):
    """(TorchNVILA, directory): the tiny model written in the official layout and converted (float32) with
    `nvila-jax convert`'s converter; read-only for the tests that use it."""
    from checkpoints_convert.convert import convert
    from helpers.official_checkpoint import write_official_checkpoint
    from nvila_jax.variants import tiny

    ref, _ = make_reference(tiny())
    root = tmp_path_factory.mktemp("tiny_checkpoint")
    convert(write_official_checkpoint(ref, root / "official"), str(root / "converted"), dtype="float32",
            progress=False)
    return ref, str(root / "converted")
