"""Reading an official NVILA checkpoint directory: its layout, config files, tensor files and index files.

Two layouts are recognised (NVILA_REFERENCE.md §1):
- "official": config.json + llm/ + vision_tower/ + mm_projector/, each a standalone HF directory with
  model.safetensors or sharded model-*.safetensors + model.safetensors.index.json; tokenizer files in llm/.
- "hf" (the `*-hf` repos): one config.json with `text_config` / `vision_config`, all tensors at the root
  under the prefixes `llm.`, `vision_tower.` and `mm_projector.`; tokenizer files at the root (or in llm/).

Only headers are read here; every problem found (unreadable or truncated files, corrupt or inconsistent
index files, pickled weights) is collected as a sentence so that the caller reports all of them at once.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os

from checkpoints_convert.key_table import split_hf_layout_key
from checkpoints_convert.safetensors_io import SafetensorsError, SafetensorsHeader, TensorRef, read_header

INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclasses.dataclass
class SourceCheckpoint:
    """What an official checkpoint directory holds, as far as headers and small files tell."""

    root: str
    layout: str  # "official" | "hf"
    tokenizer_dir: str
    headers: list[tuple[str, SafetensorsHeader]]  # (component or "" for the hf root, header), in file order
    tensors: dict[tuple[str, str], TensorRef]  # (component, key as the component's own directory names it)
    small_files: list[str]  # relative paths of every non-tensor file (configs, tokenizer, index files)
    problems: list[str]
    # tensors that could not be listed because their file is missing or unreadable (already a problem):
    unlisted_keys: set[tuple[str, str]] = dataclasses.field(default_factory=set)  # known from an index
    unlisted_components: set[str] = dataclasses.field(default_factory=set)  # no index: any key may be there

    def relpath(self, path: str) -> str:
        return os.path.relpath(path, self.root)


def read_source(root: str) -> SourceCheckpoint:
    """Scans `root`; never raises for a bad checkpoint (see `.problems`)."""
    root = os.path.abspath(os.fspath(root))
    src = SourceCheckpoint(root, "official", os.path.join(root, "llm"), [], {}, [], [])
    if not os.path.isdir(root):
        src.problems.append(f"{root}: not a directory" if os.path.exists(root) else f"{root}: does not exist")
        return src
    if not os.listdir(root):
        src.problems.append(f"{root}: the directory is empty; expected an official NVILA checkpoint "
                            "(config.json + llm/ + vision_tower/ + mm_projector/)")
        return src
    if os.path.isdir(os.path.join(root, "params")) and os.path.isfile(os.path.join(root, "manifest.json")):
        src.problems.append(f"{root}: already an nvila_jax checkpoint; load it with nvila_jax.load_pretrained, or "
                            "write the official layout back with `nvila-jax export`")
        return src
    top = os.path.join(root, "config.json")
    if not os.path.isfile(top):
        src.problems.append(f"{top}: not found; expected an official NVILA checkpoint "
                            "(config.json + llm/ + vision_tower/ + mm_projector/)")
    else:
        try:
            with open(top, encoding="utf-8") as f:
                cfg = json.load(f)
            if isinstance(cfg, dict) and (cfg.get("model_type") in ("nvila", "nvila_lite") or "text_config" in cfg):
                src.layout = "hf"
                has_tokenizer = any(os.path.isfile(os.path.join(root, n)) for n in ("tokenizer.json", "vocab.json"))
                src.tokenizer_dir = root if has_tokenizer or not os.path.isdir(src.tokenizer_dir) else src.tokenizer_dir
        except (OSError, ValueError):
            pass  # reported by the config reader, which names the exact error
    if src.layout == "official":
        for component in ("llm", "vision_tower", "mm_projector"):
            d = os.path.join(root, component)
            if not os.path.isdir(d):
                src.problems.append(f"{d}: missing component directory {component}/")
                src.unlisted_components.add(component)
                continue
            _scan_dir(src, d, component)
    else:
        _scan_dir(src, root, "")
    src.small_files = _small_files(root)
    return src


def _scan_dir(src: SourceCheckpoint, directory: str, component: str) -> None:
    """Reads the tensor files of one directory (through its index when there is one)."""
    index_path = os.path.join(directory, INDEX_FILE)
    files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
    weight_map: dict[str, str] | None = None
    if os.path.exists(index_path):
        weight_map = _read_index(src, index_path)
        if weight_map is not None:
            listed = sorted({os.path.join(directory, f) for f in weight_map.values()})
            for f in listed:
                if not os.path.exists(f):
                    src.problems.append(f"{index_path}: lists shard {os.path.basename(f)}, which does not exist")
                    _unlisted(src, component, weight_map, os.path.basename(f))
            files = [f for f in listed if os.path.exists(f)] + [f for f in files if f not in listed]
    if not files:
        pickled = sorted(p for p in os.listdir(directory) if p.endswith(PICKLE_SUFFIXES))
        where = src.relpath(directory) if directory != src.root else "the checkpoint root"
        if pickled:
            src.problems.append(
                f"{where}: only pickled weights ({', '.join(pickled)}); nvila_jax never unpickles checkpoints. "
                "Convert them to safetensors first, e.g. load the model in PyTorch and call "
                "save_pretrained(..., safe_serialization=True)")
        else:
            src.problems.append(f"{where}: no *.safetensors weight files")
        _unlisted(src, component, None, "")
        return
    for path in files:
        try:
            header = read_header(path)
        except SafetensorsError as e:
            src.problems.append(str(e))
            _unlisted(src, component, weight_map, os.path.basename(path))
            continue
        src.headers.append((component, header))
        name = os.path.basename(path)
        for key, ref in header.tensors.items():
            split = (component, key) if component else split_hf_layout_key(key)
            if split is None:
                src.problems.append(f"{src.relpath(path)}: unexpected tensor {key!r} (the -hf layout prefixes "
                                    "every key with llm., vision_tower. or mm_projector.)")
                continue
            comp, k = split
            if (comp, k) in src.tensors:
                other = src.relpath(src.tensors[(comp, k)].file)
                src.problems.append(f"{src.relpath(path)}: tensor {key!r} is also in {other}")
                continue
            if weight_map is not None and key not in weight_map:
                src.problems.append(f"{index_path}: does not list tensor {key!r} of {name}")
            elif weight_map is not None and weight_map[key] != name:
                src.problems.append(f"{index_path}: maps {key!r} to {weight_map[key]} but {name} holds it")
            src.tensors[(comp, k)] = ref
    if weight_map is not None:
        have = {k for _, h in src.headers for k in h.tensors if os.path.dirname(h.path) == directory}
        for key, shard in weight_map.items():
            if key not in have and os.path.exists(os.path.join(directory, shard)):
                src.problems.append(f"{index_path}: lists {key!r} in {shard}, which does not contain it")


def _unlisted(src: SourceCheckpoint, component: str, weight_map: dict[str, str] | None, shard: str) -> None:
    """Records the tensors of a shard that cannot be read, so they are not reported missing one by one."""
    if weight_map is None:
        src.unlisted_components.update([component] if component else ["llm", "vision_tower", "mm_projector"])
        return
    for key, name in weight_map.items():
        if name == shard:
            split = (component, key) if component else split_hf_layout_key(key)
            if split is not None:
                src.unlisted_keys.add(split)


def _read_index(src: SourceCheckpoint, path: str) -> dict[str, str] | None:
    try:
        with open(path, encoding="utf-8") as f:
            index = json.load(f)
    except OSError as e:
        src.problems.append(f"{path}: cannot be read ({e.strerror or e})")
        return None
    except ValueError as e:
        src.problems.append(f"{path}: corrupt index, not valid JSON ({e})")
        return None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        src.problems.append(f"{path}: corrupt index, expected {{\"weight_map\": {{tensor: shard file}}}}")
        return None
    return weight_map


def _small_files(root: str) -> list[str]:
    """Relative paths of every file that is not a tensor file (kept verbatim for export); hidden files and
    directories (download caches, .git) are skipped."""
    out = []
    for dirpath, dirnames, names in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for n in names:
            if not n.startswith(".") and not n.endswith(".safetensors") and not n.endswith(PICKLE_SUFFIXES):
                out.append(os.path.relpath(os.path.join(dirpath, n), root))
    return sorted(out)
