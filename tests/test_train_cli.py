"""Stage configs, config overrides, stage chaining (init_from), DeltaLoss pruning and the loss plot."""

from __future__ import annotations

import glob
import json
import os

import jax
import numpy as np
import pytest

from nvila_jax.cli import main
from nvila_jax.data import synthetic
from nvila_jax.train.config import RunConfigError, apply_overrides, load_config, model_config, tiny_config

ROOT = os.path.join(os.path.dirname(__file__), "..")

# NVILA_REFERENCE.md §7: (trainable modules, LR, clipping, max length) per stage.
REFERENCE = {
    "nvila/stage1_projector_alignment.py": ({"projector"}, 1e-3, 0.0, 8192, "NVILA-8B"),
    "nvila/stage2_vision_encoder_pretraining.py": ({"vision_tower", "projector"}, 2e-5, 5.0, 8192, "NVILA-8B"),
    "nvila/stage3_token_processor_pretraining.py": ({"projector", "llm"}, 2e-5, 0.0, 8192, "NVILA-8B"),
    "nvila/stage4_image_instruction_tuning.py": ({"vision_tower", "projector", "llm"}, 1.5e-5, 5.0, 8192,
                                                 "NVILA-8B"),
    "nvila/stage5_video_instruction_tuning.py": ({"vision_tower", "projector", "llm"}, 2e-5, 0.0, 16384,
                                                 "NVILA-8B-Video"),
    "nvila_lite/stage1_align.py": ({"projector"}, 1e-3, 0.0, 4096, "NVILA-Lite-8B"),
    "nvila_lite/stage2_vision_encoder.py": ({"vision_tower", "projector"}, 5e-5, 0.0, 4096, "NVILA-Lite-8B"),
    "nvila_lite/stage3_pretrain.py": ({"projector", "llm"}, 5e-5, 0.0, 4096, "NVILA-Lite-8B"),
    "nvila_lite/stage4_sft.py": ({"vision_tower", "projector", "llm"}, 2e-5, 0.0, 4096, "NVILA-Lite-8B"),
}


def test_stage_configs_follow_the_reference_and_chain():
    found = sorted(os.path.relpath(p, os.path.join(ROOT, "configs"))
                   for p in glob.glob(os.path.join(ROOT, "configs", "nvila*", "*.py")))
    assert found == sorted(REFERENCE)
    for family in ("nvila", "nvila_lite"):
        stages = sorted(k for k in REFERENCE if k.startswith(family + "/"))
        previous = None
        for name in stages:
            c = load_config(os.path.join(ROOT, "configs", name))
            trainable, lr, clip, length, variant = REFERENCE[name]
            assert (set(c.trainable), c.learning_rate, c.max_grad_norm, c.data.seq_len, c.model) == \
                (trainable, lr, clip, length, variant), name
            assert c.compute_dtype == "bfloat16" and c.warmup_ratio == 0.03 and c.weight_decay == 0.0
            cfg = model_config(c)
            assert c.data.seq_len <= cfg.model_max_length
            if previous is not None:  # initialised from the previous stage's run directory
                assert c.init_from == previous, name
            previous = f"runs/{'nvila-8b' if family == 'nvila' else 'nvila-lite-8b'}/{os.path.basename(name).split('_')[0]}"
    video = load_config(os.path.join(ROOT, "configs", "nvila/stage5_video_instruction_tuning.py"))
    assert video.data.num_video_frames == 256 and model_config(video).video_encoder.pool_sizes == ((8, 1, 1),)


def test_overrides():
    c = tiny_config()
    apply_overrides(c, ["--config.num_train_steps=7", "--config.data.tile_buckets=(8,16)", "--config.remat=full",
                        "--config.async_checkpointing=false", "--config.learning_rate=1",
                        "--config.model_overrides={'max_tiles': 8}", "--config.module_learning_rates.llm=0.5"])
    assert (c.num_train_steps, c.data.tile_buckets, c.remat, c.async_checkpointing, c.learning_rate) == \
        (7, (8, 16), "full", False, 1.0)
    assert model_config(c).max_tiles == 8 and c.module_learning_rates.llm == 0.5
    for bad, msg in (("--config.num_train_step=3", "unknown key"), ("--config.num_train_steps=abc", "literal"),
                     ("--config.num_train_steps=1.5", "expected int"), ("--config.nope.x=1", "no config section"),
                     ("--num_train_steps=3", "overrides look like")):
        with pytest.raises(RunConfigError, match=msg):
            apply_overrides(tiny_config(), [bad])
    c = tiny_config()
    apply_overrides(c, ["--config.model_overrides={'llm': {'hiden_size': 3}}"])
    with pytest.raises(RunConfigError, match="Qwen2Config has no field 'hiden_size'"):
        model_config(c)
    c = tiny_config()
    apply_overrides(c, ["--config.model_overrides={'max_tiles': 3}"])
    with pytest.raises(RunConfigError, match="model_overrides: invalid NVILA config"):
        model_config(c)


TINY_RUN = ["--config.data.synthetic_records=24", "--config.data.rows_per_batch=2",
            "--config.data.tile_buckets=(16,)", "--config.peak_tflops_per_device=1.0", "--config.log_every=1",
            "--config.save_every=2", "--config.async_checkpointing=false"]


def test_stage_chaining_prune_and_plot(tmp_path, capsys):
    """Stage A trains the projector; stage B starts from A's output and trains the LLM only. Then DeltaLoss
    pruning with A's and B's models, the pruned mixture, and the loss plot."""
    config = os.path.join(ROOT, "configs", "tiny.py")
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["train", "--config", config, "--workdir", str(a), "--config.num_train_steps=2",
                 "--config.trainable=('projector',)", *TINY_RUN]) == 0
    assert main(["train", "--config", config, "--workdir", str(b), "--config.num_train_steps=2",
                 f"--config.init_from={a}", "--config.trainable=('llm',)", "--config.tokenizer=",
                 *TINY_RUN]) == 0
    from nvila_jax.checkpoint import restore_params

    pa, pb = restore_params(a / "model"), restore_params(b / "model")
    jax.tree.map(np.testing.assert_array_equal, pa["projector"], pb["projector"])  # carried over, frozen in B
    jax.tree.map(np.testing.assert_array_equal, pa["vision_tower"], pb["vision_tower"])
    assert any(jax.tree.leaves(jax.tree.map(lambda x, y: bool((x != y).any()), pa["llm"], pb["llm"])))
    with open(b / "config.json") as f:
        assert json.load(f)["tokenizer"] == str(a / "model" / "tokenizer")

    data = synthetic.write_dataset(str(tmp_path / "shapes"), 12, seed=4)
    (tmp_path / "mix.yaml").write_text(f"datasets:\n  - {{name: shapes, path: {data}}}\n")
    assert main(["prune", "--mixture", str(tmp_path / "mix.yaml"), "--small", str(a / "model"), "--large",
                 str(b / "model"), "--fraction", "0.5", "--out", str(tmp_path / "slices"), "--seq-len", "384",
                 "--rows", "2", "--tiles", "16"]) == 0
    with open(tmp_path / "slices" / "0.5" / "shapes.json") as f:
        dropped = json.load(f)
    with open(tmp_path / "slices" / "scores" / "shapes.jsonl") as f:
        scores = [json.loads(line) for line in f]
    assert len(scores) == 12 and len(dropped) == 6
    delta = {s["index"]: s["delta"] for s in scores}
    kept = set(range(12)) - set(dropped)
    assert min(delta[i] for i in kept) >= max(delta[i] for i in dropped)  # the largest deltas are kept
    (tmp_path / "pruned.yaml").write_text(f"slice_folder: slices\ndatasets:\n  - {{name: shapes@0.5, path: {data}}}\n")
    from nvila_jax.data.mixture import load_mixture
    from nvila_jax.data.pipeline import mixture_dataset

    ds = mixture_dataset(load_mixture(str(tmp_path / "pruned.yaml")), 0, shuffle=False, repeat=False)
    assert sorted(e.index for e in ds) == sorted(kept)

    assert main(["plot", str(b)]) == 0
    with open(b / "loss.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert main(["plot", str(tmp_path)]) == 2
