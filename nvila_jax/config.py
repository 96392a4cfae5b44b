"""Typed, frozen model configuration, read from and written to the official NVILA config files.

The official checkpoint keeps one config.json at the top and one per sub-model (llm/, vision_tower/,
mm_projector/); older copies nest them as `llm_cfg`, `vision_tower_cfg`, `mm_projector_cfg`. Every field
that changes the computation lives here, so that a model is fully described by one `NVILAConfig`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Mapping

TILING_MODES = ("dynamic_s2", "dynamic", "resize")
PROJECTOR_TYPES = (
    "mlp_downsample",
    "mlp_downsample_2x2_fix",
    "mlp_downsample_3x3_fix",
    "linear",
    "identity",
)  # plus mlp{N}x_gelu, see projector_downsample()
VIDEO_ENCODERS = ("basic", "tsp")


class ConfigError(ValueError):
    """A config file or field that nvila_jax cannot use, with the reason."""


@dataclasses.dataclass(frozen=True)
class SiglipConfig:
    """SigLIP vision tower (HF `SiglipVisionModel` field names)."""

    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    patch_size: int = 14
    image_size: int = 448
    num_channels: int = 3
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def grid_size(self) -> int:
        """Patches per side of one tile (32 for 448/14)."""
        return self.image_size // self.patch_size

    def to_hf_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(model_type="siglip_vision_model", architectures=["SiglipVisionModel"], vision_use_head=False)
        return d


@dataclasses.dataclass(frozen=True)
class Qwen2Config:
    """Qwen2 / Qwen2.5 decoder (HF `Qwen2ForCausalLM` field names)."""

    vocab_size: int = 151648
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    head_dim: int = 128
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    def to_hf_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(model_type="qwen2", architectures=["Qwen2ForCausalLM"], use_sliding_window=False)
        return d


@dataclasses.dataclass(frozen=True)
class ProjectorConfig:
    """Multimodal projector: optional k x k space-to-channel, then an MLP (official `mm_projector_type`)."""

    projector_type: str = "mlp_downsample"
    mm_hidden_size: int = 3456  # channels entering the projector (3 x 1152 with Dynamic-S2)
    hidden_size: int = 3584  # LLM width

    @property
    def downsample(self) -> int:
        return projector_downsample(self.projector_type)


@dataclasses.dataclass(frozen=True)
class MediaEncoderConfig:
    """How projected features become an embedding block (official `image_encoder` / `video_encoder`).

    `kind="tsp"` mean-pools the projected frame features over (t, h, w) groups for each of `pool_sizes`.
    Token strings are embedded with the LLM's embedding table around each image / frame.
    """

    kind: str = "basic"
    start_tokens: str | None = None
    end_tokens: str | None = "\n"
    sep_tokens: str | None = None
    pool_sizes: tuple[tuple[int, int, int], ...] = ()


@dataclasses.dataclass(frozen=True)
class NVILAConfig:
    """The whole model: vision tower, projector, LLM and the media handling around them."""

    vision: SiglipConfig = SiglipConfig()
    projector: ProjectorConfig = ProjectorConfig()
    llm: Qwen2Config = Qwen2Config()
    tiling: str = "dynamic_s2"
    s2_scales: tuple[int, ...] = (448, 896, 1344)
    s2_resize_output_to_scale_idx: int = -1
    min_tiles: int = 1
    max_tiles: int = 12
    video_max_tiles: int = 1
    select_layer: int = -2
    select_feature: str = "cls_patch"
    num_video_frames: int = 8
    image_encoder: MediaEncoderConfig = MediaEncoderConfig()
    video_encoder: MediaEncoderConfig = MediaEncoderConfig()
    model_max_length: int = 8192
    image_token_id: int | None = None
    video_token_id: int | None = None
    name: str = "nvila"

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ConfigError("invalid NVILA config:\n  - " + "\n  - ".join(problems))

    def problems(self) -> list[str]:
        """Every inconsistency in this config, as readable sentences (empty when valid)."""
        p: list[str] = []
        if self.tiling not in TILING_MODES:
            p.append(f"tiling (image_aspect_ratio) is {self.tiling!r}; expected one of {TILING_MODES}")
        try:
            self.projector.downsample
        except ConfigError as e:
            p.append(str(e))
        if self.tiling == "dynamic_s2":
            s = self.s2_scales
            if list(s) != sorted(s) or any(x % s[0] for x in s):
                p.append(f"s2_scales {s} must be increasing multiples of the first scale")
            if s and s[0] != self.vision.image_size:
                p.append(f"s2_scales[0]={s[0]} must equal the vision tower image_size {self.vision.image_size}")
            if not -len(s) <= self.s2_resize_output_to_scale_idx < len(s):
                p.append(f"s2_resize_output_to_scale_idx={self.s2_resize_output_to_scale_idx} out of range")
            if (s[-1] // s[0]) ** 2 > self.max_tiles:
                p.append(f"max_tiles={self.max_tiles} is below the last scale's {(s[-1] // s[0]) ** 2} tiles")
        want_c = self.vision.hidden_size * (len(self.s2_scales) if self.tiling == "dynamic_s2" else 1)
        if self.projector.mm_hidden_size != want_c:
            p.append(
                f"mm_hidden_size={self.projector.mm_hidden_size} but the vision features have {want_c} channels "
                f"({self.vision.hidden_size} x {len(self.s2_scales) if self.tiling == 'dynamic_s2' else 1} scales)"
            )
        if self.projector.hidden_size != self.llm.hidden_size:
            p.append(f"projector output {self.projector.hidden_size} != LLM hidden_size {self.llm.hidden_size}")
        if self.select_feature != "cls_patch":
            p.append(f"mm_vision_select_feature={self.select_feature!r}; only 'cls_patch' (all tokens) is supported")
        if not 0 <= self.num_vision_layers_used <= self.vision.num_hidden_layers:
            p.append(f"mm_vision_select_layer={self.select_layer} outside the {self.vision.num_hidden_layers} layers")
        if self.vision.image_size % self.vision.patch_size:
            p.append(f"image_size {self.vision.image_size} is not a multiple of patch_size {self.vision.patch_size}")
        for enc_name, enc in (("image_encoder", self.image_encoder), ("video_encoder", self.video_encoder)):
            if enc.kind not in VIDEO_ENCODERS or (enc_name == "image_encoder" and enc.kind != "basic"):
                p.append(f"{enc_name} kind {enc.kind!r} is not supported")
            if enc.kind == "tsp" and not enc.pool_sizes:
                p.append(f"{enc_name} is TSP but has no pool_sizes")
        if self.llm.num_attention_heads % self.llm.num_key_value_heads:
            p.append("num_attention_heads must be a multiple of num_key_value_heads")
        return p

    @property
    def num_vision_layers_used(self) -> int:
        """Encoder layers that feed `hidden_states[select_layer]` (26 of 27 for -2); the rest are skipped."""
        n = self.vision.num_hidden_layers
        return n + 1 + self.select_layer if self.select_layer < 0 else self.select_layer

    @property
    def tokens_per_tile(self) -> int:
        """Visual tokens of one independent tile after space-to-channel (256 for 32x32 and 2x2)."""
        k = self.projector.downsample
        g = self.vision.grid_size
        return (-(-g // k)) ** 2

    # ------------------------------------------------------------------ official config files
    @classmethod
    def from_hf_config(cls, path_or_dict: str | os.PathLike | Mapping[str, Any], **overrides: Any) -> "NVILAConfig":
        """Reads an official checkpoint's config.json (+ llm/, vision_tower/, mm_projector/ sub-configs).

        `path_or_dict` is the checkpoint directory, its config.json, or the parsed top-level dict (sub-configs
        then come from its nested `*_cfg` entries). Media token ids are read from the tokenizer files when the
        directory has them; `overrides` replace any top-level field.
        """
        root = None
        if isinstance(path_or_dict, Mapping):
            top = dict(path_or_dict)
        else:
            path = os.fspath(path_or_dict)
            root = path if os.path.isdir(path) else os.path.dirname(path)
            top = _read_json(os.path.join(root, "config.json") if os.path.isdir(path) else path)
        if top.get("model_type") in ("nvila", "nvila_lite") or "text_config" in top:
            return _from_hf_layout(top, root, overrides)
        llm = _sub_config(top, root, "llm")
        vis = _sub_config(top, root, "vision_tower")
        proj = _sub_config(top, root, "mm_projector")
        return _assemble(top, llm, vis, proj, root, overrides)

    def to_hf_config(self) -> dict[str, dict[str, Any]]:
        """The official config files: {"config.json": ..., "llm": ..., "vision_tower": ..., "mm_projector": ...}."""
        llm = self.llm.to_hf_dict()
        llm["model_max_length"] = self.model_max_length
        vis = self.vision.to_hf_dict()
        proj = {"mm_projector_type": self.projector.projector_type, "model_type": "v2l_projector",
                "architectures": ["MultimodalProjector"]}
        top = {
            "architectures": ["LlavaLlamaModel"],
            "model_type": "llava_llama",
            "hidden_size": self.llm.hidden_size,
            "mm_hidden_size": self.projector.mm_hidden_size,
            "image_aspect_ratio": self.tiling,
            "dynamic_s2": self.tiling == "dynamic_s2",
            "s2": False,
            "s2_scales": ",".join(str(s) for s in self.s2_scales),
            "s2_max_split_size": self.s2_scales[0],
            "s2_resize_output_to_scale_idx": self.s2_resize_output_to_scale_idx,
            "min_tiles": self.min_tiles,
            "max_tiles": self.max_tiles,
            "video_max_tiles": self.video_max_tiles,
            "mm_vision_select_layer": self.select_layer,
            "mm_vision_select_feature": self.select_feature,
            "mm_use_im_start_end": False,
            "mm_use_im_patch_token": True,
            "num_video_frames": self.num_video_frames,
            "model_max_length": self.model_max_length,
            "image_encoder": _encoder_to_hf(self.image_encoder, "image"),
            "video_encoder": _encoder_to_hf(self.video_encoder, "video"),
            "llm_cfg": llm,
            "vision_tower_cfg": vis,
            "mm_projector_cfg": proj,
        }
        return {"config.json": top, "llm": llm, "vision_tower": vis, "mm_projector": proj}

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "NVILAConfig":
        d = json.loads(text)
        enc = lambda e: MediaEncoderConfig(**{**e, "pool_sizes": tuple(tuple(p) for p in e["pool_sizes"])})
        return cls(
            **{
                **d,
                "vision": SiglipConfig(**d["vision"]),
                "projector": ProjectorConfig(**d["projector"]),
                "llm": Qwen2Config(**d["llm"]),
                "s2_scales": tuple(d["s2_scales"]),
                "image_encoder": enc(d["image_encoder"]),
                "video_encoder": enc(d["video_encoder"]),
            }
        )


def projector_downsample(projector_type: str) -> int:
    """Space-to-channel factor k of a projector type (1 = none); unknown types raise ConfigError."""
    if projector_type in ("mlp_downsample", "mlp_downsample_2x2_fix"):
        return 2
    if projector_type == "mlp_downsample_3x3_fix":
        return 3
    if projector_type in ("linear", "identity") or re.fullmatch(r"mlp\d+x_gelu", projector_type or ""):
        return 1
    raise ConfigError(
        f"unknown mm_projector_type {projector_type!r}; expected one of {PROJECTOR_TYPES} or mlp<N>x_gelu"
    )


# ---------------------------------------------------------------------- helpers for from_hf_config
def _read_json(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None


def _sub_config(top: Mapping[str, Any], root: str | None, name: str) -> dict[str, Any]:
    """A sub-model config: <root>/<name>/config.json when present, else the nested `<name>_cfg` dict."""
    if root is not None and os.path.isfile(os.path.join(root, name, "config.json")):
        return _read_json(os.path.join(root, name, "config.json"))
    nested = top.get(f"{name}_cfg")
    if isinstance(nested, Mapping):
        return dict(nested)
    raise ConfigError(f"no config for {name!r}: expected {name}/config.json or a `{name}_cfg` entry in config.json")


def _need(d: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in d:
        raise ConfigError(f"{where}: missing required field {key!r}")
    return d[key]


def _qwen2_from_hf(llm: Mapping[str, Any], where: str) -> Qwen2Config:
    heads = _need(llm, "num_attention_heads", where)
    hidden = _need(llm, "hidden_size", where)
    rope = llm.get("rope_theta")
    if rope is None:
        rope = (llm.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    scaling = llm.get("rope_scaling") or {}
    if scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
        raise ConfigError(f"{where}: rope_scaling {scaling} is not supported (only default RoPE)")
    eos = llm.get("eos_token_id")
    return Qwen2Config(
        vocab_size=_need(llm, "vocab_size", where),
        hidden_size=hidden,
        intermediate_size=_need(llm, "intermediate_size", where),
        num_hidden_layers=_need(llm, "num_hidden_layers", where),
        num_attention_heads=heads,
        num_key_value_heads=llm.get("num_key_value_heads", heads),
        head_dim=llm.get("head_dim") or hidden // heads,
        rope_theta=float(rope),
        rms_norm_eps=llm.get("rms_norm_eps", 1e-6),
        max_position_embeddings=llm.get("max_position_embeddings", 32768),
        tie_word_embeddings=bool(llm.get("tie_word_embeddings", False)),
        hidden_act=llm.get("hidden_act", "silu"),
        bos_token_id=llm.get("bos_token_id"),
        eos_token_id=eos[0] if isinstance(eos, list) else eos,
    )


def _siglip_from_hf(vis: Mapping[str, Any], where: str) -> SiglipConfig:
    vis = vis.get("vision_config", vis)  # a full SiglipModel config nests the vision part
    return SiglipConfig(
        hidden_size=_need(vis, "hidden_size", where),
        intermediate_size=_need(vis, "intermediate_size", where),
        num_hidden_layers=_need(vis, "num_hidden_layers", where),
        num_attention_heads=_need(vis, "num_attention_heads", where),
        patch_size=_need(vis, "patch_size", where),
        image_size=_need(vis, "image_size", where),
        num_channels=vis.get("num_channels", 3),
        layer_norm_eps=vis.get("layer_norm_eps", 1e-6),
        hidden_act=vis.get("hidden_act", "gelu_pytorch_tanh"),
    )


def _encoder_from_hf(raw: Any, where: str) -> MediaEncoderConfig:
    """Reads a hydra-style encoder spec: a dict or a JSON string with `_target_` and keyword arguments."""
    if raw is None:
        return MediaEncoderConfig()
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{where}: not valid JSON ({e})") from None
    target = str(raw.get("_target_", "Basic")).rsplit(".", 1)[-1]
    kinds = {"BasicImageEncoder": "basic", "BasicVideoEncoder": "basic", "TSPVideoEncoder": "tsp"}
    if target not in kinds:
        raise ConfigError(f"{where}: encoder {target!r} is not supported (expected one of {sorted(kinds)})")
    pools = tuple(tuple(int(v) for v in p) for p in raw.get("pool_sizes", ()) or ())
    if any(len(p) != 3 for p in pools):
        raise ConfigError(f"{where}: pool_sizes {raw.get('pool_sizes')} must be (t, h, w) triples")
    return MediaEncoderConfig(
        kind=kinds[target],
        start_tokens=raw.get("start_tokens"),
        end_tokens=raw.get("end_tokens", "\n"),
        sep_tokens=raw.get("sep_tokens"),
        pool_sizes=pools,
    )


def _encoder_to_hf(enc: MediaEncoderConfig, media: str) -> dict[str, Any]:
    target = {"basic": f"Basic{media.capitalize()}Encoder", "tsp": "TSPVideoEncoder"}[enc.kind]
    d: dict[str, Any] = {"_target_": f"llava.model.encoders.{target}"}
    if enc.start_tokens is not None:
        d["start_tokens"] = enc.start_tokens
    if enc.end_tokens != "\n":
        d["end_tokens"] = enc.end_tokens
    if enc.sep_tokens is not None:
        d["sep_tokens"] = enc.sep_tokens
    if enc.kind == "tsp":
        d["pool_sizes"] = [list(p) for p in enc.pool_sizes]
    return d


def _media_token_ids(root: str | None) -> dict[str, int]:
    """Ids of <image> / <vila/video> from the checkpoint's tokenizer files, when it has them."""
    if root is None:
        return {}
    from nvila_jax.text.tokenizer import read_added_tokens  # local import: text depends on config

    added = read_added_tokens(os.path.join(root, "llm"))
    ids = {}
    if "<image>" in added:
        ids["image_token_id"] = added["<image>"]
    if "<vila/video>" in added:
        ids["video_token_id"] = added["<vila/video>"]
    return ids


def _assemble(top, llm, vis, proj, root, overrides) -> NVILAConfig:
    tiling = top.get("image_aspect_ratio", "resize")
    if tiling in (None, "pad", "square"):
        tiling = "resize"
    if top.get("s2") and not top.get("dynamic_s2"):
        raise ConfigError("config.json: fixed-scale S2 (`s2: true` without `dynamic_s2`) is not supported")
    if tiling == "dynamic_s2" and not top.get("dynamic_s2", True):
        raise ConfigError("config.json: image_aspect_ratio is 'dynamic_s2' but `dynamic_s2` is false")
    scales_raw = top.get("s2_scales", "448,896,1344")
    scales = tuple(sorted(int(s) for s in (scales_raw.split(",") if isinstance(scales_raw, str) else scales_raw)))
    llm_cfg = _qwen2_from_hf(llm, "llm config")
    vis_cfg = _siglip_from_hf(vis, "vision_tower config")
    ptype = proj.get("mm_projector_type")
    if ptype is None:
        raise ConfigError("mm_projector config: missing required field 'mm_projector_type'")
    mm_hidden = top.get("mm_hidden_size")
    if mm_hidden is None:
        mm_hidden = vis_cfg.hidden_size * (len(scales) if tiling == "dynamic_s2" else 1)
    fields = dict(
        vision=vis_cfg,
        llm=llm_cfg,
        projector=ProjectorConfig(projector_type=ptype, mm_hidden_size=mm_hidden, hidden_size=llm_cfg.hidden_size),
        tiling=tiling,
        s2_scales=scales if tiling == "dynamic_s2" else (vis_cfg.image_size,),
        s2_resize_output_to_scale_idx=top.get("s2_resize_output_to_scale_idx", -1),
        min_tiles=top.get("min_tiles", 1),
        max_tiles=top.get("max_tiles", 12),
        video_max_tiles=top.get("video_max_tiles", 1),
        select_layer=top.get("mm_vision_select_layer", -2),
        select_feature=top.get("mm_vision_select_feature", "cls_patch"),
        num_video_frames=top.get("num_video_frames", 8),
        image_encoder=_encoder_from_hf(top.get("image_encoder"), "config.json image_encoder"),
        video_encoder=_encoder_from_hf(top.get("video_encoder"), "config.json video_encoder"),
        model_max_length=top.get("model_max_length") or llm.get("model_max_length") or 8192,
        name=os.path.basename(os.path.normpath(root)) if root else top.get("_name_or_path", "nvila"),
    )
    if fields["video_max_tiles"] > 1:
        raise ConfigError("config.json: video_max_tiles > 1 (tiled video frames) is not supported")
    fields.update(_media_token_ids(root))
    fields.update(overrides)
    return NVILAConfig(**fields)


def _from_hf_layout(top, root, overrides) -> NVILAConfig:
    """The `*-hf` repos: `text_config` / `vision_config` / token ids in one config.json."""
    llm = _need(top, "text_config", "config.json")
    vis = _need(top, "vision_config", "config.json")
    ptype = top.get("mm_projector_type") or (top.get("mm_projector_cfg") or {}).get("mm_projector_type")
    if ptype is None:
        ptype = "mlp_downsample_3x3_fix" if top.get("model_type") == "nvila_lite" else "mlp_downsample"
    merged = {**top, "mm_projector_cfg": {"mm_projector_type": ptype}}
    merged.setdefault("image_aspect_ratio", "dynamic" if top.get("model_type") == "nvila_lite" else "dynamic_s2")
    merged.setdefault("dynamic_s2", merged["image_aspect_ratio"] == "dynamic_s2")
    ids = {k: top[k] for k in ("image_token_id", "video_token_id") if top.get(k) is not None}
    return _assemble(merged, llm, vis, merged["mm_projector_cfg"], None, {**ids, **overrides})
