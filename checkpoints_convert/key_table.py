"""The declarative map between official NVILA tensor names and nvila_jax parameter paths.

Official checkpoints keep three standalone HF directories (NVILA_REFERENCE.md §1): `llm/` (Qwen2 keys),
`vision_tower/` (SigLIP keys) and `mm_projector/` (`layers.{i}.*`). Each rule below maps one official key
pattern of one component to a parameter path and a transform; per-layer keys go to one slice of a stacked
(scanned) parameter. Vision layers past the selected one and the post-LayerNorm are not parameters of the
model (never computed): they map to UNUSED and are carried beside the parameters so export is lossless.
A tied LM head (`tie_word_embeddings`) has no parameter either; a checkpoint that still stores
`lm_head.weight` gets it carried the same way (an optional rule).

The `*-hf` repos keep all three components in one directory, their keys prefixed with the component name
(`llm.model.norm.weight`, `vision_tower.vision_model.*`, `mm_projector.layers.*`): `split_hf_layout_key`
splits off the component, after which the same rules apply.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Iterator

import numpy as np

from nvila_jax.config import NVILAConfig
from nvila_jax.models.projector import layer_name, projector_layout

COMPONENTS = ("llm", "vision_tower", "mm_projector")
UNUSED = ("unused",)


@dataclasses.dataclass(frozen=True)
class KeyRule:
    """official `component`/`pattern` (a regex; group `layer` = layer index) <-> `path` with `transform`."""

    component: str
    pattern: str
    path: tuple[str, ...]
    transform: str = "identity"
    optional: bool = False  # may be absent from a checkpoint (only UNUSED rules)

    def match(self, component: str, key: str) -> re.Match | None:
        return re.fullmatch(self.pattern, key) if component == self.component else None

    def official_key(self, layer: int | None) -> str:
        key = self.pattern.replace(r"(?P<layer>\d+)", str(layer)) if layer is not None else self.pattern
        return key.replace("\\", "")


def _llm_rules(cfg: NVILAConfig) -> list[KeyRule]:
    L = r"model\.layers\.(?P<layer>\d+)\."
    rules = [KeyRule("llm", r"model\.embed_tokens\.weight", ("llm", "embed_tokens", "embedding"))]
    for n, kind in (("q_proj", "q"), ("k_proj", "kv"), ("v_proj", "kv")):
        rules += [
            KeyRule("llm", L + rf"self_attn\.{n}\.weight", ("llm", "layers", n, "kernel"), f"heads_in_{kind}"),
            KeyRule("llm", L + rf"self_attn\.{n}\.bias", ("llm", "layers", n, "bias"), f"heads_bias_{kind}"),
        ]
    rules.append(KeyRule("llm", L + r"self_attn\.o_proj\.weight", ("llm", "layers", "o_proj", "kernel"), "heads_out_q"))
    for n in ("gate_proj", "up_proj", "down_proj"):
        rules.append(KeyRule("llm", L + rf"mlp\.{n}\.weight", ("llm", "layers", n, "kernel"), "transpose"))
    for n in ("input_layernorm", "post_attention_layernorm"):
        rules.append(KeyRule("llm", L + rf"{n}\.weight", ("llm", "layers", n, "scale")))
    rules.append(KeyRule("llm", r"model\.norm\.weight", ("llm", "norm", "scale")))
    if not cfg.llm.tie_word_embeddings:
        rules.append(KeyRule("llm", r"lm_head\.weight", ("llm", "lm_head", "kernel"), "transpose"))
    else:
        rules.append(KeyRule("llm", r"lm_head\.weight", UNUSED, optional=True))
    return rules


def _vision_rules() -> list[KeyRule]:
    E = r"vision_model\.embeddings\."
    L = r"vision_model\.encoder\.layers\.(?P<layer>\d+)\."
    V = ("vision_tower",)
    rules = [
        KeyRule("vision_tower", E + r"patch_embedding\.weight", V + ("patch_kernel",), "conv_oihw_to_hwio"),
        KeyRule("vision_tower", E + r"patch_embedding\.bias", V + ("patch_bias",)),
        KeyRule("vision_tower", E + r"position_embedding\.weight", V + ("position_embedding",)),
    ]
    for n in ("q_proj", "k_proj", "v_proj"):
        rules += [
            KeyRule("vision_tower", L + rf"self_attn\.{n}\.weight", V + ("layers", n, "kernel"), "heads_in_vit"),
            KeyRule("vision_tower", L + rf"self_attn\.{n}\.bias", V + ("layers", n, "bias"), "heads_bias_vit"),
        ]
    rules += [
        KeyRule("vision_tower", L + r"self_attn\.out_proj\.weight", V + ("layers", "out_proj", "kernel"), "heads_out_vit"),
        KeyRule("vision_tower", L + r"self_attn\.out_proj\.bias", V + ("layers", "out_proj", "bias")),
    ]
    for n in ("layer_norm1", "layer_norm2"):
        rules += [
            KeyRule("vision_tower", L + rf"{n}\.weight", V + ("layers", n, "scale")),
            KeyRule("vision_tower", L + rf"{n}\.bias", V + ("layers", n, "bias")),
        ]
    for n in ("fc1", "fc2"):
        rules += [
            KeyRule("vision_tower", L + rf"mlp\.{n}\.weight", V + ("layers", n, "kernel"), "transpose"),
            KeyRule("vision_tower", L + rf"mlp\.{n}\.bias", V + ("layers", n, "bias")),
        ]
    # Computed by the reference, never used by NVILA: kept for lossless export.
    rules += [
        KeyRule("vision_tower", r"vision_model\.post_layernorm\.weight", UNUSED),
        KeyRule("vision_tower", r"vision_model\.post_layernorm\.bias", UNUSED),
    ]
    return rules


def _projector_rules(cfg: NVILAConfig) -> list[KeyRule]:
    rules = []
    bare = cfg.projector.projector_type == "linear"
    for i, spec in enumerate(projector_layout(cfg.projector)):
        if spec.kind not in ("ln", "dense"):
            continue
        prefix = r"layers\." if bare else rf"layers\.{i}\."
        path = ("projector", layer_name(cfg.projector, i))
        weight = ("scale", "identity") if spec.kind == "ln" else ("kernel", "transpose")
        rules += [
            KeyRule("mm_projector", prefix + "weight", path + (weight[0],), weight[1]),
            KeyRule("mm_projector", prefix + "bias", path + ("bias",)),
        ]
    return rules


def key_rules(cfg: NVILAConfig) -> list[KeyRule]:
    """Every rule for this config (the projector's depend on its type, the LM head on tying)."""
    return _llm_rules(cfg) + _vision_rules() + _projector_rules(cfg)


def layer_count(cfg: NVILAConfig, rule: KeyRule) -> int:
    """How many official layers a per-layer rule covers (all of them, used or not)."""
    return cfg.llm.num_hidden_layers if rule.component == "llm" else cfg.vision.num_hidden_layers


def official_keys(cfg: NVILAConfig, include_optional: bool = False) -> Iterator[tuple[str, str]]:
    """(component, key) of every tensor an official checkpoint of this config holds (plus the ones it may
    hold, with `include_optional`)."""
    for rule in key_rules(cfg):
        if rule.optional and not include_optional:
            continue
        if "(?P<layer>" in rule.pattern:
            for i in range(layer_count(cfg, rule)):
                yield rule.component, rule.official_key(i)
        else:
            yield rule.component, rule.official_key(None)


def resolve(cfg: NVILAConfig, component: str, key: str) -> tuple[KeyRule, int | None] | None:
    """The rule and layer index of an official key, or None when no rule matches (an unexpected key).

    SigLIP keys saved by transformers >= 5 lack the `vision_model.` prefix of the released checkpoints; both
    spellings resolve to the same rule.
    """
    if component == "vision_tower" and not key.startswith("vision_model."):
        key = "vision_model." + key
    for rule in key_rules(cfg):
        m = rule.match(component, key)
        if m:
            return rule, (int(m.group("layer")) if "layer" in m.groupdict() else None)
    return None


def is_used(cfg: NVILAConfig, rule: KeyRule, layer: int | None) -> bool:
    """False for tensors the model never computes with (vision layers past the selected one, post-LN)."""
    if rule.path == UNUSED:
        return False
    return not (rule.component == "vision_tower" and layer is not None and layer >= cfg.num_vision_layers_used)


# ---------------------------------------------------------------------------------- transforms
def _heads(cfg: NVILAConfig, kind: str) -> tuple[int, int]:
    if kind == "q":
        return cfg.llm.num_attention_heads, cfg.llm.head_dim
    if kind == "kv":
        return cfg.llm.num_key_value_heads, cfg.llm.head_dim
    return cfg.vision.num_attention_heads, cfg.vision.head_dim


def to_param(cfg: NVILAConfig, transform: str, x: np.ndarray) -> np.ndarray:
    """Official tensor -> parameter layout (torch Linear [out, in] -> kernel [in, out], heads split)."""
    if transform == "identity":
        return x
    if transform == "transpose":
        return x.T
    if transform == "conv_oihw_to_hwio":
        return x.transpose(2, 3, 1, 0)
    op, kind = transform.rsplit("_", 1)
    h, d = _heads(cfg, kind)
    if op == "heads_in":
        return x.T.reshape(x.shape[1], h, d)
    if op == "heads_bias":
        return x.reshape(h, d)
    if op == "heads_out":
        return x.T.reshape(h, d, x.shape[0])
    raise ValueError(f"unknown transform {transform!r}")


def from_param(cfg: NVILAConfig, transform: str, x: np.ndarray) -> np.ndarray:
    """The inverse of `to_param`."""
    if transform == "identity":
        return x
    if transform == "transpose":
        return x.T
    if transform == "conv_oihw_to_hwio":
        return x.transpose(3, 2, 0, 1)
    op, _ = transform.rsplit("_", 1)
    if op == "heads_in":
        return x.reshape(x.shape[0], -1).T
    if op == "heads_bias":
        return x.reshape(-1)
    if op == "heads_out":
        return x.reshape(-1, x.shape[-1]).T
    raise ValueError(f"unknown transform {transform!r}")


def official_shape(transform: str, param_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The official tensor's shape for a parameter (one layer's slice) of `param_shape`: `from_param` on shapes."""
    s = tuple(param_shape)
    if transform == "identity":
        return s
    if transform == "transpose":
        return s[::-1]
    if transform == "conv_oihw_to_hwio":
        return (s[3], s[2], s[0], s[1])
    op, _ = transform.rsplit("_", 1)
    if op == "heads_in":
        return (s[1] * s[2], s[0])
    if op == "heads_bias":
        return (s[0] * s[1],)
    if op == "heads_out":
        return (s[2], s[0] * s[1])
    raise ValueError(f"unknown transform {transform!r}")


def row_axis(transform: str) -> int | None:
    """The parameter axis that the official tensor's rows (axis 0) become, for transforms that keep rows whole
    (so a tensor can be converted a block of rows at a time); None for the others."""
    return {"identity": 0, "transpose": 1}.get(transform)


# ---------------------------------------------------------------------------------- in memory
def state_dicts_to_params(
    cfg: NVILAConfig, tensors: dict[str, dict[str, np.ndarray]]
) -> tuple[dict, dict[str, dict[str, np.ndarray]]]:
    """{component: {key: array}} -> (nested params, {component: {key: array}} of unused tensors).

    In-memory and unvalidated: the streaming, validating converter is `checkpoints_convert.convert`.
    """
    params: dict = {}
    unused: dict[str, dict[str, np.ndarray]] = {}
    stacked: dict[tuple[str, ...], dict[int, np.ndarray]] = {}
    for component, sd in tensors.items():
        for key, value in sd.items():
            found = resolve(cfg, component, key)
            if found is None:
                raise KeyError(f"{component}/{key}: no nvila_jax parameter for this tensor")
            rule, layer = found
            if not is_used(cfg, rule, layer):
                unused.setdefault(component, {})[key] = np.asarray(value)
                continue
            x = to_param(cfg, rule.transform, np.asarray(value))
            if layer is None:
                _set(params, rule.path, x)
            else:
                stacked.setdefault(rule.path, {})[layer] = x
    for path, layers in stacked.items():
        _set(params, path, np.stack([layers[i] for i in range(len(layers))]))
    return params, unused


def params_to_state_dicts(
    cfg: NVILAConfig, params: dict, unused: dict[str, dict[str, np.ndarray]] | None = None
) -> dict[str, dict[str, np.ndarray]]:
    """The inverse of `state_dicts_to_params`."""
    out: dict[str, dict[str, np.ndarray]] = {c: {} for c in COMPONENTS}
    for component, key in official_keys(cfg, include_optional=True):
        rule, layer = resolve(cfg, component, key)
        if not is_used(cfg, rule, layer):
            if rule.optional and key not in (unused or {}).get(component, {}):
                continue
            out[component][key] = (unused or {})[component][key]
            continue
        x = np.asarray(_get(params, rule.path))
        out[component][key] = from_param(cfg, rule.transform, x if layer is None else x[layer])
    return out


# ---------------------------------------------------------------------------------- the -hf layout
def split_hf_layout_key(key: str) -> tuple[str, str] | None:
    """`llm.model.norm.weight` -> ("llm", "model.norm.weight"); None for a key without a component prefix."""
    component, _, rest = key.partition(".")
    return (component, rest) if component in COMPONENTS and rest else None


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def _get(tree: dict, path: tuple[str, ...]):
    for p in path:
        tree = tree[p]
    return tree
