"""The converted checkpoint's fast tokenizer, built from the tokenizer files a release ships.

Releases ship either a fast tokenizer (tokenizer.json) or only the slow Qwen2 files (vocab.json, merges.txt,
tokenizer_config.json, added_tokens.json). From slow files the fast tokenizer is built as transformers'
Qwen2 conversion does: byte-level BPE over the vocabulary and merges, NFC normalisation (the slow Qwen2
tokenizer normalises its input to NFC), the Qwen2 pre-tokenisation regex split followed by byte-level mapping
without its own regex, byte-level decoding; then the added tokens with their recorded ids and flags.

The official loader adds <vila/sentinel>, <image>, <vila/video> as special tokens, in that order, when the
tokenizer lacks them (NVILA_REFERENCE.md §1); so does `build_tokenizer`, which reports the ids it added.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors

from nvila_jax.text.tokenizer import NVILA_TOKENS, TokenizerError

QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
SLOW_TOKENIZER_CLASSES = ("Qwen2Tokenizer", "Qwen2TokenizerFast")
# Files copied beside tokenizer.json when the source has them (the chat template may live in its own file).
COPIED_FILES = ("special_tokens_map.json", "chat_template.jinja", "chat_template.json")


@dataclasses.dataclass
class BuiltTokenizer:
    """The fast tokenizer, its tokenizer_config.json, and what building it did."""

    backend: tokenizers.Tokenizer
    config: dict[str, Any]
    source_kind: str  # "fast" (tokenizer.json) or "slow" (vocab.json + merges.txt)
    added: dict[str, int]  # NVILA tokens added here (absent from the source), in the official order
    source_dir: str

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def save(self, directory: str) -> None:
        """tokenizer.json + tokenizer_config.json (+ the source's special-token map and chat template files)."""
        os.makedirs(directory, exist_ok=True)
        self.backend.save(os.path.join(directory, "tokenizer.json"))
        with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(self.config, f, indent=2, ensure_ascii=False)
        for name in COPIED_FILES:
            src = os.path.join(self.source_dir, name)
            if os.path.isfile(src):
                with open(src, "rb") as fi, open(os.path.join(directory, name), "wb") as fo:
                    fo.write(fi.read())


def build_tokenizer(directory: str) -> BuiltTokenizer:
    """Builds the fast tokenizer of a release's tokenizer directory and adds the missing NVILA tokens.

    Raises TokenizerError listing every problem (missing files, an unsupported tokenizer class, added token ids
    that disagree between files or leave gaps)."""
    problems: list[str] = []
    config = _read_json(os.path.join(directory, "tokenizer_config.json"), problems, required=False) or {}
    added_json = _read_json(os.path.join(directory, "added_tokens.json"), problems, required=False) or {}
    fast_path = os.path.join(directory, "tokenizer.json")
    if os.path.isfile(fast_path):
        kind = "fast"
        try:
            backend = tokenizers.Tokenizer.from_file(fast_path)
        except Exception as e:  # the tokenizers library raises its own exception types
            raise TokenizerError(f"{fast_path}: cannot be read as a tokenizer ({e})") from None
        for content, tid in sorted(added_json.items(), key=lambda kv: kv[1]):
            have = backend.token_to_id(content)
            if have != tid:
                problems.append(f"{directory}/added_tokens.json: {content!r} has id {tid} but tokenizer.json gives "
                                f"{'no such token' if have is None else have}")
    else:
        kind = "slow"
        backend = _build_from_slow_files(directory, config, added_json, problems)
    if problems:
        raise TokenizerError("\n".join(problems))
    added = {}
    for token in NVILA_TOKENS:
        if backend.token_to_id(token) is None:
            backend.add_special_tokens([AddedToken(token, special=True, normalized=False)])
            added[token] = backend.token_to_id(token)
    config = _updated_config(config, backend, added)
    return BuiltTokenizer(backend, config, kind, added, directory)


def _build_from_slow_files(directory: str, config: dict, added_json: dict, problems: list[str]
                           ) -> tokenizers.Tokenizer | None:
    vocab = _read_json(os.path.join(directory, "vocab.json"), problems, required=True)
    merges_path = os.path.join(directory, "merges.txt")
    merges = None
    try:
        with open(merges_path, encoding="utf-8") as f:
            lines = f.read().split("\n")
        merges = [tuple(line.split()) for i, line in enumerate(lines)
                  if line.strip() and not (i == 0 and line.startswith("#version"))]
        bad = [m for m in merges if len(m) != 2]
        if bad:
            problems.append(f"{merges_path}: {len(bad)} lines are not 'left right' merges, e.g. {' '.join(bad[0])!r}")
    except FileNotFoundError:
        problems.append(f"{directory}: no tokenizer.json and no merges.txt; expected a fast tokenizer "
                        "(tokenizer.json) or the slow files vocab.json + merges.txt")
    except (OSError, UnicodeDecodeError) as e:
        problems.append(f"{merges_path}: cannot be read ({e})")
    cls = config.get("tokenizer_class")
    if cls is not None and cls not in SLOW_TOKENIZER_CLASSES:
        problems.append(f"{directory}/tokenizer_config.json: tokenizer_class {cls!r} has no tokenizer.json and "
                        f"only {SLOW_TOKENIZER_CLASSES} can be built from slow files")
    if vocab is None or merges is None or problems:
        return None
    backend = tokenizers.Tokenizer(models.BPE(
        vocab=vocab, merges=merges, dropout=None, unk_token=None, continuing_subword_prefix="",
        end_of_word_suffix="", fuse_unk=False, byte_fallback=False))
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=bool(config.get("add_prefix_space", False)), use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    _add_recorded_tokens(backend, directory, config, added_json, problems)
    return backend


def _add_recorded_tokens(backend: tokenizers.Tokenizer, directory: str, config: dict, added_json: dict,
                         problems: list[str]) -> None:
    """Adds the tokens of added_tokens_decoder / added_tokens.json at their recorded ids, in id order."""
    decoder = {int(i): t for i, t in (config.get("added_tokens_decoder") or {}).items()}
    by_id: dict[int, dict] = {i: dict(t) for i, t in decoder.items()}
    specials = _special_token_names(config)
    for content, tid in added_json.items():
        if tid in by_id and by_id[tid].get("content") != content:
            problems.append(f"{directory}: id {tid} is {by_id[tid].get('content')!r} in tokenizer_config.json but "
                            f"{content!r} in added_tokens.json")
        by_id.setdefault(tid, {"content": content, "special": content in specials})
    for tid in sorted(by_id):
        t = by_id[tid]
        special = bool(t.get("special", False))
        token = AddedToken(t["content"], single_word=bool(t.get("single_word", False)),
                           lstrip=bool(t.get("lstrip", False)), rstrip=bool(t.get("rstrip", False)),
                           normalized=bool(t.get("normalized", not special)), special=special)
        (backend.add_special_tokens if special else backend.add_tokens)([token])
        got = backend.token_to_id(t["content"])
        if got != tid:
            problems.append(f"{directory}: added token {t['content']!r} is recorded with id {tid} but lands at {got} "
                            "(added token ids must follow the vocabulary without gaps)")
            return


def _special_token_names(config: dict) -> set[str]:
    names = set(config.get("additional_special_tokens") or [])
    for k in ("eos_token", "pad_token", "bos_token", "unk_token"):
        v = config.get(k)
        names.add(v.get("content") if isinstance(v, dict) else v)
    return {n for n in names if n}


def _updated_config(config: dict, backend: tokenizers.Tokenizer, added: dict[str, int]) -> dict:
    """The source tokenizer_config.json with the added NVILA tokens recorded, loading as a fast tokenizer."""
    out = dict(config)
    decoder = dict(out.get("added_tokens_decoder") or {})
    for token, tid in added.items():
        decoder[str(tid)] = {"content": token, "lstrip": False, "normalized": False, "rstrip": False,
                             "single_word": False, "special": True}
    if decoder:
        out["added_tokens_decoder"] = dict(sorted(decoder.items(), key=lambda kv: int(kv[0])))
    out["tokenizer_class"] = "Qwen2TokenizerFast" if out.get("tokenizer_class", "Qwen2Tokenizer") in \
        SLOW_TOKENIZER_CLASSES else out["tokenizer_class"]
    return out


def _read_json(path: str, problems: list[str], required: bool) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        if required:
            problems.append(f"{path}: not found (needed to build the tokenizer)")
    except (OSError, UnicodeDecodeError) as e:
        problems.append(f"{path}: cannot be read ({e})")
    except ValueError as e:
        problems.append(f"{path}: not valid JSON ({e})")
    return None
