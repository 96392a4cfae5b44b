"""Everything the converter checks before it writes anything, and the plan it then follows.

`plan_conversion(src)` reads the headers, config files and tokenizer of an official checkpoint and compares
them with what the config implies: every expected tensor present, nothing unexpected, shapes as the config
says, floating-point dtypes, embedding rows equal to the LLM config's vocab_size, media token ids in the
config equal to the tokenizer's. All problems are collected and raised together as one CheckpointError.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax

from checkpoints_convert.key_table import (
    UNUSED, KeyRule, is_used, layer_count, official_keys, official_shape, resolve)
from checkpoints_convert.safetensors_io import FLOAT_DTYPES, TensorRef
from checkpoints_convert.source import SourceCheckpoint, read_source
from checkpoints_convert.tokenizer_build import BuiltTokenizer, build_tokenizer
from nvila_jax.config import ConfigError, NVILAConfig
from nvila_jax.text.tokenizer import IMAGE_TOKEN, VIDEO_TOKEN, TokenizerError

VOCAB_KEYS = ("model.embed_tokens.weight", "lm_head.weight")


class CheckpointError(ValueError):
    """A checkpoint that cannot be converted; `problems` lists every reason found (paths relative to it)."""

    def __init__(self, where: str, problems: list[str]):
        self.problems = list(problems)
        super().__init__(f"{where}: {len(problems)} problem{'s' * (len(problems) != 1)} found, nothing was "
                         "written:\n  - " + "\n  - ".join(problems))


@dataclasses.dataclass(frozen=True)
class ParamSource:
    """One nvila_jax parameter and the official tensors it is made of (one per layer when stacked)."""

    path: tuple[str, ...]
    rule: KeyRule
    shape: tuple[int, ...]  # the full parameter (layers axis first when stacked; vocabulary padded)
    refs: tuple[TensorRef, ...]
    stacked: bool
    source_rows: int | None  # official rows of a vocabulary table (padded to shape's rows), else None


@dataclasses.dataclass(frozen=True)
class ConversionPlan:
    source: SourceCheckpoint
    source_config: NVILAConfig  # as the checkpoint's files describe it
    config: NVILAConfig  # what nvila_jax runs: vocabulary padded to the tokenizer, media token ids set
    tokenizer: BuiltTokenizer
    params: tuple[ParamSource, ...]
    unused: tuple[tuple[str, str, TensorRef], ...]  # (component, key, tensor) carried beside the params
    source_rows: int  # embedding rows in the checkpoint
    suppressed_token_ids: tuple[int, ...]  # ids without trained rows (padded) or without a token


def plan_conversion(src: str) -> ConversionPlan:
    """Validates the checkpoint at `src` completely; raises CheckpointError listing every problem."""
    source = read_source(src)
    problems = list(source.problems)
    if problems and not source.headers and not source.tensors:
        raise CheckpointError(source.root, problems)
    cfg = tok = None
    try:
        cfg = NVILAConfig.from_hf_config(source.root)
    except ConfigError as e:
        lines = str(e).split("\n")  # NVILAConfig lists its own problems under one heading
        problems.extend([f"config: {l.strip().removeprefix('- ')}" for l in lines[1:]] if len(lines) > 1 else lines)
    try:
        tok = build_tokenizer(source.tokenizer_dir)
    except TokenizerError as e:
        problems.extend(str(e).split("\n"))
    rows = None
    if cfg is not None:
        rows = _check_tensors(cfg, source, problems)
    if cfg is not None and tok is not None:
        for name, token in (("image_token_id", IMAGE_TOKEN), ("video_token_id", VIDEO_TOKEN)):
            want, have = getattr(cfg, name), tok.token_id(token)
            if want is not None and want != have:
                problems.append(f"the config's {name} is {want} but the tokenizer's {token} is {have}")
    if problems:
        raise CheckpointError(source.root, [p.replace(source.root + os.sep, "") for p in problems])
    return _plan(source, cfg, tok, rows)


def _plan(source: SourceCheckpoint, cfg: NVILAConfig, tok: BuiltTokenizer, rows: int) -> ConversionPlan:
    size = len(tok)
    final = dataclasses.replace(
        cfg, llm=dataclasses.replace(cfg.llm, vocab_size=max(rows, size)),
        image_token_id=tok.token_id(IMAGE_TOKEN), video_token_id=tok.token_id(VIDEO_TOKEN))
    shapes = _param_shapes(final)
    grouped: dict[tuple[str, ...], dict[int | None, TensorRef]] = {}
    rules: dict[tuple[str, ...], KeyRule] = {}
    unused = []
    for (component, key), ref in source.tensors.items():
        rule, layer = resolve(cfg, component, key)
        if not is_used(cfg, rule, layer):
            unused.append((component, key, ref))
            continue
        grouped.setdefault(rule.path, {})[layer] = ref
        rules[rule.path] = rule
    params = []
    for path, refs in grouped.items():
        stacked = None not in refs
        ordered = tuple(refs[i] for i in sorted(refs)) if stacked else (refs[None],)
        vocab = not stacked and rules[path].official_key(None) in VOCAB_KEYS
        params.append(ParamSource(path, rules[path], shapes[path], ordered, stacked, rows if vocab else None))
    suppressed = tuple(range(min(rows, size), max(rows, size)))
    return ConversionPlan(source, cfg, final, tok, tuple(params), tuple(unused), rows, suppressed)


def _check_tensors(cfg: NVILAConfig, source: SourceCheckpoint, problems: list[str]) -> int | None:
    """Missing / unexpected keys, shapes, dtypes and vocabulary rows; returns the embedding rows."""
    shapes = _param_shapes(cfg)
    expected = {resolve(cfg, c, k)[0:2]: (c, k) for c, k in official_keys(cfg)}
    seen = set()
    for (component, key), ref in source.tensors.items():
        where = f"{source.relpath(ref.file)}: tensor {key!r}"
        found = resolve(cfg, component, key)
        if found is None or (found[1] is not None and found[1] >= layer_count(cfg, found[0])):
            problems.append(f"{where}: unexpected, no {component} tensor of this name in a checkpoint of this config")
            continue
        rule, layer = found
        seen.add((rule, layer))
        if ref.dtype not in FLOAT_DTYPES:
            problems.append(f"{where}: dtype {ref.dtype}, expected a floating-point dtype ({', '.join(FLOAT_DTYPES)})")
        if key in VOCAB_KEYS:
            continue  # checked against the config's vocab_size below
        want = _official_shape(cfg, rule, shapes)
        if want is not None and ref.shape != want:
            problems.append(f"{where}: shape {list(ref.shape)}, expected {list(want)} for this config")
    # tensors that may sit in a file that could not be read are that file's problem, reported once
    unlisted = {found[:2] for c, k in source.unlisted_keys if (found := resolve(cfg, c, k)) is not None}
    for (rule, layer), (component, key) in expected.items():
        if (rule, layer) in seen or rule.optional or (rule, layer) in unlisted:
            continue
        if component not in source.unlisted_components:
            problems.append(f"missing tensor {component}/{key}")
    return _check_vocab(cfg, source, problems)


def _check_vocab(cfg: NVILAConfig, source: SourceCheckpoint, problems: list[str]) -> int | None:
    rows = None
    for key in VOCAB_KEYS:
        ref = source.tensors.get(("llm", key))
        if ref is None:
            continue
        want = (cfg.llm.vocab_size, cfg.llm.hidden_size)
        if ref.shape != want:
            problems.append(f"{source.relpath(ref.file)}: tensor {key!r} has shape {list(ref.shape)} but the LLM "
                            f"config says vocab_size={cfg.llm.vocab_size}, hidden_size={cfg.llm.hidden_size} "
                            f"(expected {list(want)})")
        if rows is None and ref.shape:
            rows = ref.shape[0]
    return rows


def _official_shape(cfg: NVILAConfig, rule: KeyRule, shapes: dict) -> tuple[int, ...] | None:
    if rule.path == UNUSED:  # the vision post-LayerNorm, or a tied model's stored LM head
        return (cfg.vision.hidden_size,) if rule.component == "vision_tower" else (cfg.llm.vocab_size,
                                                                                  cfg.llm.hidden_size)
    shape = shapes.get(rule.path)
    if shape is None:  # a vision layer rule when no vision layer is used at all
        return None
    return official_shape(rule.transform, shape[1:] if "(?P<layer>" in rule.pattern else shape)


@functools.lru_cache(maxsize=16)
def _param_shapes(cfg: NVILAConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """{parameter path: shape} of the model of `cfg` (abstract evaluation: nothing is allocated)."""
    from flax.linen import meta

    from nvila_jax.models.nvila import init_params

    tree = jax.eval_shape(lambda: meta.unbox(init_params(cfg, jax.random.key(0))))
    return {tuple(str(k.key) for k in kp): tuple(leaf.shape)
            for kp, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
