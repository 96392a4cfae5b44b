"""The fast tokenizer the converter builds from a release's tokenizer files encodes exactly like transformers'
Qwen2Tokenizer loaded from the same files, and like a transcription of the slow Qwen2 BPE; the NVILA tokens
are added in the official order; inconsistent files are reported."""

from __future__ import annotations

import json
import os
import unicodedata

import numpy as np
import pytest
import regex
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from checkpoints_convert.tokenizer_build import QWEN2_PRETOKENIZE_REGEX, build_tokenizer
from helpers.official_checkpoint import NVILA_TOKENS, load_official_tokenizer, write_tokenizer_files
from nvila_jax.text.tokenizer import NVILATokenizer, TokenizerError

PIECES = ["What", " color", " is", " the", " circle", "?", " How many", " shapes", "12345", " 7", "0.5", "'s", "'LL",
          " don't", "  ", "   ", "\t", "\n", "\n\n", "\r\n", " \n ", "café", "cafe\u0301", "Straße", "你好", "世界",
          "🙂", "—", "...", "!!", " (x)", "[1]", "\"quoted\"", "<image>", "<|im_end|>", "<vila/video>", "<|im_start|>",
          "x<image>y", " a", "b", "ÅÄÖ", "\u00a0", "ﬁ", "①", "١٢٣"]


def _strings(n: int = 150, seed: int = 0) -> list[str]:
    rng = np.random.RandomState(seed)
    out = list(PIECES)
    for _ in range(n):
        out.append("".join(rng.choice(PIECES, size=rng.randint(1, 12))))
    return out


@pytest.fixture(scope="module")
def hf_tiny(tokenizer_dir):
    return PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="module", params=[("slow", True), ("slow", False), ("fast", True), ("fast", False)],
                ids=lambda p: f"{p[0]}-{'with' if p[1] else 'without'}-media-tokens")
def layout(request, hf_tiny, tmp_path_factory):
    kind, media = request.param
    d = write_tokenizer_files(hf_tiny, tmp_path_factory.mktemp(f"tok-{kind}-{media}"), tokenizer=kind,
                              media_tokens=media)
    return kind, media, d


def test_built_tokenizer_encodes_like_transformers_qwen2(layout):
    kind, media, d = layout
    built = build_tokenizer(d)
    assert built.source_kind == kind
    assert built.added == ({} if media else {"<vila/sentinel>": 387, "<image>": 388, "<vila/video>": 389})
    official = load_official_tokenizer(d)  # AutoTokenizer on the files + the loader's NVILA tokens
    assert len(built) == len(official) == 390
    for s in _strings():
        ids = built.backend.encode(s).ids
        assert ids == official(s).input_ids, repr(s)
        assert built.backend.decode(ids, skip_special_tokens=False) == official.decode(ids), repr(s)
    for t in NVILA_TOKENS:
        assert built.token_id(t) == official.convert_tokens_to_ids(t)


def test_built_tokenizer_matches_a_transcription_of_the_slow_qwen2_bpe(layout):
    _, _, d = layout
    built = build_tokenizer(d)
    slow = SlowQwen2(d, {v["content"]: int(i) for i, v in built.config["added_tokens_decoder"].items()})
    for s in _strings(seed=1):
        assert built.backend.encode(s).ids == slow.encode(s), repr(s)


def test_saved_tokenizer_loads_in_nvila_and_transformers_with_the_same_chat_prompt(layout, tmp_path):
    _, _, d = layout
    built = build_tokenizer(d)
    built.save(str(tmp_path))
    ours = NVILATokenizer.from_dir(str(tmp_path))
    theirs = AutoTokenizer.from_pretrained(str(tmp_path))
    official = load_official_tokenizer(d)
    messages = [{"role": "user", "content": "<image>\nWhat color is the circle?"}]
    prompt = ours.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt == official.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert ours.encode(prompt) == theirs(prompt).input_ids == official(prompt).input_ids
    assert (ours.image_token_id, ours.video_token_id) == (388, 389)
    assert ours.stop_token_ids == (official.convert_tokens_to_ids("<|im_end|>"),)
    assert ours.model_max_length == 4096


def _slow_files(hf_tiny, tmp_path, **kw):
    return write_tokenizer_files(hf_tiny, tmp_path / "tok", tokenizer="slow", **kw)


def test_added_token_ids_with_a_gap_are_reported(hf_tiny, tmp_path):
    d = _slow_files(hf_tiny, tmp_path, media_tokens=False)
    path = os.path.join(d, "added_tokens.json")
    added = json.load(open(path))
    added["<|im_start|>"] = 390
    json.dump(added, open(path, "w"))
    cfg_path = os.path.join(d, "tokenizer_config.json")
    cfg = json.load(open(cfg_path))
    cfg["added_tokens_decoder"]["390"] = cfg["added_tokens_decoder"].pop("385")
    json.dump(cfg, open(cfg_path, "w"))
    with pytest.raises(TokenizerError, match=r"'<\|im_end\|>' is recorded with id 386 but lands at 385 \(added "
                                             r"token ids must follow the vocabulary without gaps\)"):
        build_tokenizer(d)


def test_files_that_disagree_are_reported(hf_tiny, tmp_path):
    d = _slow_files(hf_tiny, tmp_path)
    path = os.path.join(d, "added_tokens.json")
    added = json.load(open(path))
    added["<image>"] = 386
    json.dump(added, open(path, "w"))
    with pytest.raises(TokenizerError, match=r"id 386 is '<\|im_end\|>' in tokenizer_config.json but '<image>' in "
                                             r"added_tokens.json"):
        build_tokenizer(d)


def test_other_tokenizer_classes_need_a_tokenizer_json(hf_tiny, tmp_path):
    d = _slow_files(hf_tiny, tmp_path)
    cfg_path = os.path.join(d, "tokenizer_config.json")
    cfg = json.load(open(cfg_path))
    cfg["tokenizer_class"] = "LlamaTokenizer"
    json.dump(cfg, open(cfg_path, "w"))
    os.remove(os.path.join(d, "merges.txt"))
    with pytest.raises(TokenizerError) as err:
        build_tokenizer(d)
    assert "no tokenizer.json and no merges.txt" in str(err.value)
    assert "tokenizer_class 'LlamaTokenizer'" in str(err.value)


# ---------------------------------------------------------------------- transcription of the slow Qwen2 tokenizer
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (used by the Qwen2 vocabulary)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


class SlowQwen2:
    """The slow Qwen2Tokenizer's algorithm: split off added tokens, NFC, the Qwen2 regex, bytes -> unicode,
    then BPE merging the lowest-ranked pair until none applies."""

    def __init__(self, directory: str, added: dict[str, int]):
        self.vocab = json.load(open(os.path.join(directory, "vocab.json")))
        lines = open(os.path.join(directory, "merges.txt"), encoding="utf-8").read().split("\n")
        merges = [tuple(l.split()) for i, l in enumerate(lines) if l and not (i == 0 and l.startswith("#version"))]
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.bytes = _bytes_to_unicode()
        self.pattern = regex.compile(QWEN2_PRETOKENIZE_REGEX)
        self.added = added
        self.split = regex.compile("(" + "|".join(regex.escape(t) for t in sorted(added, key=len, reverse=True)) + ")")

    def bpe(self, word: list[str]) -> list[str]:
        while len(word) > 1:
            pairs = [(word[i], word[i + 1]) for i in range(len(word) - 1)]
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        return word

    def encode(self, text: str) -> list[int]:
        ids = []
        for chunk in self.split.split(unicodedata.normalize("NFC", text)):
            if chunk in self.added:
                ids.append(self.added[chunk])
                continue
            for piece in self.pattern.findall(chunk):
                ids += [self.vocab[t] for t in self.bpe([self.bytes[b] for b in piece.encode("utf-8")])]
        return ids
