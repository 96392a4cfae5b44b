"""Tiny checkpoints in the official NVILA layout, written from a PyTorch reference (`TorchNVILA`).

The layout is the one of the `Efficient-Large-Model/NVILA-*` releases (NVILA_REFERENCE.md §1):

    config.json                 top-level LlavaLlamaModel config with nested llm_cfg / vision_tower_cfg / ...
    trainer_state.json          (present in the releases; carries nothing the model needs)
    llm/                        Qwen2ForCausalLM: model-0000i-of-0000n.safetensors + model.safetensors.index.json,
                                config.json, generation_config.json, tokenizer files
    vision_tower/               SiglipVisionModel: model.safetensors, config.json, preprocessor_config.json
    mm_projector/               model.safetensors (`layers.{i}.*`), config.json

    write_official_checkpoint(ref, path, shards=2, tokenizer="fast" | "slow", media_tokens=True,
                              dtype="float32" | "bfloat16", vocab_rows=None, layout="official" | "hf") -> path
    write_tokenizer_files(hf_tokenizer, directory, tokenizer="slow", media_tokens=True)   only the tokenizer files
    load_official_tokenizer(path)   the HF tokenizer the official loader builds from those files
    official_reference(ref, path)   `ref`'s modules with that tokenizer: the reference forward of the checkpoint

Tokenizer files are written like a Qwen2 release, from the reference tokenizer's byte-level BPE vocabulary and
merges: `tokenizer="slow"` writes only vocab.json, merges.txt, tokenizer_config.json (with the chat template),
added_tokens.json and special_tokens_map.json; `"fast"` adds the tokenizer.json that transformers' own
Qwen2Tokenizer builds from them. `media_tokens=False` leaves out <vila/sentinel>, <image>, <vila/video> (which
must be the last ids of the reference tokenizer) and, by default, their embedding / lm_head rows, as a release
whose tokenizer lacks them. `vocab_rows` sets the number of embedding rows written explicitly (fewer rows than
tokens: a release whose tables were not resized; the reference may also have more rows than tokens).
`layout="hf"` writes the `*-hf` variant: one directory, one config with `text_config` / `vision_config`, and
all tensors under `llm.` / `vision_tower.` / `mm_projector.` in shards at the root (key prefixes UNVERIFIED
in the reference notes; this is the converter's reading of them).
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

NVILA_TOKENS = ("<vila/sentinel>", "<image>", "<vila/video>")
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def write_official_checkpoint(
    ref: Any,
    path: str | os.PathLike,
    *,
    shards: int = 2,
    tokenizer: str = "fast",
    media_tokens: bool = True,
    dtype: str = "float32",
    vocab_rows: int | None = None,
    layout: str = "official",
) -> str:
    """Writes `ref` (a `TorchNVILA`) as an official checkpoint directory at `path`; returns the path."""
    if tokenizer not in ("fast", "slow"):
        raise ValueError(f"tokenizer must be 'fast' or 'slow', got {tokenizer!r}")
    if layout not in ("official", "hf"):
        raise ValueError(f"layout must be 'official' or 'hf', got {layout!r}")
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    cfg = ref.cfg
    tok = _tokenizer_parts(ref.tokenizer, media_tokens)
    rows = vocab_rows if vocab_rows is not None else (cfg.llm.vocab_size if media_tokens else tok["first_nvila_id"])
    tensors = _official_tensors(ref, rows, TORCH_DTYPES[dtype])
    hf = cfg.to_hf_config()
    llm_cfg = {**hf["llm"], "vocab_size": rows, "torch_dtype": dtype, "transformers_version": "4.46.0",
               "use_cache": True, "attention_dropout": 0.0, "initializer_range": 0.02, "sliding_window": None,
               "max_window_layers": hf["llm"]["num_hidden_layers"]}
    vis_cfg = {**hf["vision_tower"], "torch_dtype": dtype, "transformers_version": "4.46.0",
               "attention_dropout": 0.0}
    proj_cfg = {**hf["mm_projector"], "torch_dtype": dtype, "transformers_version": "4.46.0"}
    top = _top_config(hf["config.json"], llm_cfg, vis_cfg, proj_cfg, dtype)

    if layout == "official":
        llm_dir, vis_dir, proj_dir = (os.path.join(path, d) for d in ("llm", "vision_tower", "mm_projector"))
        for d in (llm_dir, vis_dir, proj_dir):
            os.makedirs(d, exist_ok=True)
        _write_json(os.path.join(path, "config.json"), top)
        _write_json(os.path.join(path, "trainer_state.json"), {"global_step": 1, "log_history": []})
        _write_sharded(tensors["llm"], llm_dir, shards)
        _write_json(os.path.join(llm_dir, "config.json"), llm_cfg)
        _write_json(os.path.join(llm_dir, "generation_config.json"), _generation_config(cfg))
        _write_tokenizer(llm_dir, tok, tokenizer, cfg.model_max_length)
        save_file(tensors["vision_tower"], os.path.join(vis_dir, "model.safetensors"), metadata={"format": "pt"})
        _write_json(os.path.join(vis_dir, "config.json"), vis_cfg)
        _write_json(os.path.join(vis_dir, "preprocessor_config.json"), _preprocessor_config(cfg))
        save_file(tensors["mm_projector"], os.path.join(proj_dir, "model.safetensors"), metadata={"format": "pt"})
        _write_json(os.path.join(proj_dir, "config.json"), proj_cfg)
    else:
        flat = {f"{c}.{k}": v for c, sd in tensors.items() for k, v in sd.items()}
        _write_sharded(flat, path, shards)
        hf_top = {k: v for k, v in top.items() if not k.endswith("_cfg") and k != "mm_hidden_size"}
        hf_top.update(model_type="nvila_lite" if cfg.tiling == "dynamic" else "nvila", architectures=["NVILAForConditionalGeneration"],
                      text_config=llm_cfg, vision_config=vis_cfg, mm_projector_type=cfg.projector.projector_type,
                      image_token_id=tok["ids"].get("<image>"), video_token_id=tok["ids"].get("<vila/video>"))
        _write_json(os.path.join(path, "config.json"), hf_top)
        _write_json(os.path.join(path, "generation_config.json"), _generation_config(cfg))
        _write_json(os.path.join(path, "preprocessor_config.json"), _preprocessor_config(cfg))
        _write_tokenizer(path, tok, tokenizer, cfg.model_max_length)
    return path


def write_tokenizer_files(hf_tokenizer: Any, directory: str | os.PathLike, *, tokenizer: str = "slow",
                          media_tokens: bool = True, model_max_length: int = 4096) -> str:
    """Writes the Qwen2-release tokenizer files of `hf_tokenizer` (a byte-level BPE PreTrainedTokenizerFast)
    into `directory`, as `write_official_checkpoint` does in llm/; returns the directory."""
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    _write_tokenizer(directory, _tokenizer_parts(hf_tokenizer, media_tokens), tokenizer, model_max_length)
    return directory


def load_official_tokenizer(path: str | os.PathLike) -> Any:
    """The HF tokenizer the official loader builds from a checkpoint: `AutoTokenizer` on llm/ (the root for
    the -hf layout), then <vila/sentinel>, <image>, <vila/video> added as special tokens when absent."""
    from transformers import AutoTokenizer

    path = os.fspath(path)
    tok_dir = os.path.join(path, "llm") if os.path.isdir(os.path.join(path, "llm")) else path
    tok = AutoTokenizer.from_pretrained(tok_dir)
    for t in NVILA_TOKENS:
        if t not in tok.get_vocab():
            tok.add_tokens([t], special_tokens=True)
    return tok


def official_reference(ref: Any, path: str | os.PathLike, tokenizer_dir: str) -> Any:
    """A `TorchNVILA` sharing `ref`'s modules whose tokenizer is the official one of the checkpoint at `path`
    (`tokenizer_dir` only satisfies the constructor). `ref` itself is left untouched."""
    from helpers.torch_nvila import TorchNVILA

    out = TorchNVILA(ref.cfg, tokenizer_dir, vision=ref.vision, llm=ref.llm, projector=ref.projector)
    out.tokenizer = load_official_tokenizer(path)
    return out


# ------------------------------------------------------------------------------------------ tensors
def _official_tensors(ref: Any, rows: int, dtype: torch.dtype) -> dict[str, dict[str, torch.Tensor]]:
    """The reference's state dicts under their released names, vocabulary tables cut / grown to `rows`."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for component, sd in ref.state_dicts().items():
        part = {}
        for key, value in sd.items():
            t = torch.from_numpy(np.ascontiguousarray(value))
            if key in ("model.embed_tokens.weight", "lm_head.weight") and t.shape[0] != rows:
                if rows > t.shape[0]:
                    raise ValueError(f"vocab_rows={rows} exceeds the reference's {t.shape[0]} rows")
                t = t[:rows]
            part[key] = t.to(dtype).contiguous()
        out[component] = part
    return out


def _write_sharded(tensors: dict[str, torch.Tensor], directory: str, shards: int) -> None:
    """HF sharding: model-0000i-of-0000n.safetensors (contiguous groups of about equal bytes, sorted keys)
    plus model.safetensors.index.json; one shard is written as model.safetensors without an index."""
    keys = sorted(tensors)
    sizes = [tensors[k].numel() * tensors[k].element_size() for k in keys]
    total = sum(sizes)
    if shards <= 1:
        save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
        return
    groups: list[list[str]] = [[] for _ in range(shards)]
    done = 0
    for k, s in zip(keys, sizes):
        groups[min(shards - 1, done * shards // total)].append(k)
        done += s
    groups = [g for g in groups if g]
    n = len(groups)
    weight_map = {}
    for i, g in enumerate(groups):
        name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        save_file({k: tensors[k] for k in g}, os.path.join(directory, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in g})
    _write_json(os.path.join(directory, "model.safetensors.index.json"),
                {"metadata": {"total_size": total}, "weight_map": weight_map})


# ------------------------------------------------------------------------------------------ configs
def _top_config(base: dict, llm_cfg: dict, vis_cfg: dict, proj_cfg: dict, dtype: str) -> dict:
    """The top-level config with the extra fields a release carries (ignored by nvila_jax)."""
    top = dict(base)
    top.update(
        model_dtype=f"torch.{dtype}", fps=0.0, num_time_tokens=0, time_token_format="<t{t}>", time_token_ids=[],
        soft_ce_std=1.0, chat_template=None, interpolate_mode="linear", vision_resolution=-1, drop_path_rate=0.0,
        resume_path="./runs/train/nvila-stage3", tune_language_model=True, tune_mm_projector=True,
        tune_vision_tower=True, transformers_version="4.46.0",
        llm_cfg=llm_cfg, vision_tower_cfg=vis_cfg, mm_projector_cfg=proj_cfg,
    )
    if top["video_encoder"].get("_target_", "").endswith("TSPVideoEncoder"):
        top["video_encoder"] = json.dumps(top["video_encoder"])  # releases may store encoders as JSON strings
    return top


def _generation_config(cfg: Any) -> dict:
    gen = {"_from_model_config": True, "transformers_version": "4.46.0"}
    if cfg.llm.bos_token_id is not None:
        gen["bos_token_id"] = cfg.llm.bos_token_id
    if cfg.llm.eos_token_id is not None:
        gen["eos_token_id"] = cfg.llm.eos_token_id
    return gen


def _preprocessor_config(cfg: Any) -> dict:
    s = cfg.vision.image_size
    return {"do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5],
            "image_processor_type": "SiglipImageProcessor", "image_std": [0.5, 0.5, 0.5], "resample": 3,
            "rescale_factor": 1 / 255, "size": {"height": s, "width": s}}


# ------------------------------------------------------------------------------------------ tokenizer
def _tokenizer_parts(hf_tokenizer: Any, media_tokens: bool) -> dict:
    """Base BPE vocabulary, merges and added tokens of the reference tokenizer (NVILA tokens dropped when
    `media_tokens` is False), plus its special tokens and chat template."""
    backend = json.loads(hf_tokenizer.backend_tokenizer.to_str())
    added = sorted(((t["id"], t["content"]) for t in backend["added_tokens"]))
    nvila = [i for i, c in added if c in NVILA_TOKENS]
    n = len(hf_tokenizer)
    first_nvila = min(nvila) if nvila else n
    if not media_tokens and nvila != list(range(n - len(nvila), n)):
        raise ValueError("media_tokens=False needs the reference tokenizer's NVILA tokens to be its last ids")
    if not media_tokens:
        added = [(i, c) for i, c in added if c not in NVILA_TOKENS]
    merges = backend["model"]["merges"]
    return {
        "vocab": backend["model"]["vocab"],
        "merges": [m if isinstance(m, str) else " ".join(m) for m in merges],
        "added": added,
        "ids": {c: i for i, c in added},
        "first_nvila_id": first_nvila,
        "eos": hf_tokenizer.eos_token,
        "pad": hf_tokenizer.pad_token,
        "chat_template": hf_tokenizer.chat_template,
    }


def _write_tokenizer(directory: str, tok: dict, kind: str, max_len: int) -> None:
    """Qwen2-release tokenizer files; for `kind="fast"` also transformers' own tokenizer.json of them."""
    _write_json(os.path.join(directory, "vocab.json"), tok["vocab"])
    with open(os.path.join(directory, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(tok["merges"]) + "\n")
    _write_json(os.path.join(directory, "added_tokens.json"), {c: i for i, c in tok["added"]})
    entry = lambda c: {"content": c, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                       "special": True}
    specials = [c for _, c in tok["added"] if c not in (tok["eos"], tok["pad"], "<|endoftext|>")]
    _write_json(os.path.join(directory, "tokenizer_config.json"), {
        "add_bos_token": False, "add_prefix_space": False,
        "added_tokens_decoder": {str(i): entry(c) for i, c in tok["added"]},
        "additional_special_tokens": specials, "bos_token": None, "chat_template": tok["chat_template"],
        "clean_up_tokenization_spaces": False, "eos_token": tok["eos"], "errors": "replace",
        "legacy": False, "model_max_length": max_len, "pad_token": tok["pad"], "padding_side": "right",
        "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer", "unk_token": None,
    })
    _write_json(os.path.join(directory, "special_tokens_map.json"), {
        "additional_special_tokens": specials, "eos_token": entry(tok["eos"]), "pad_token": entry(tok["pad"])})
    if kind == "fast":
        from transformers import Qwen2Tokenizer

        with tempfile.TemporaryDirectory() as tmp:
            Qwen2Tokenizer.from_pretrained(directory).save_pretrained(tmp)
            with open(os.path.join(tmp, "tokenizer.json"), encoding="utf-8") as f:
                fast = f.read()
        with open(os.path.join(directory, "tokenizer.json"), "w", encoding="utf-8") as f:
            f.write(fast)


def _write_json(path: str, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")
