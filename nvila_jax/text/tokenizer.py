"""The checkpoint's tokenizer (`tokenizers` library) and chat template (jinja2), as the reference uses them.

The reference calls HF `tokenizer(text).input_ids` (Qwen2 adds no BOS) and `apply_chat_template`, whose
jinja environment (sandboxed, trim_blocks, lstrip_blocks) is reproduced here so prompts are byte-identical.
"""

from __future__ import annotations

import json
import os
from functools import cached_property
from typing import Any, Mapping, Sequence

import jinja2
import jinja2.ext
import jinja2.sandbox
import tokenizers

IMAGE_TOKEN = "<image>"
VIDEO_TOKEN = "<vila/video>"
SENTINEL_TOKEN = "<vila/sentinel>"
# The order in which the official loader adds the NVILA tokens when a tokenizer lacks them.
NVILA_TOKENS = (SENTINEL_TOKEN, IMAGE_TOKEN, VIDEO_TOKEN)

# The reference's qwen2 chat template semantics; used only when a checkpoint ships no template.
DEFAULT_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a helpful assistant<|im_end|>\\n' }}"
    "{% endif %}{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class TokenizerError(ValueError):
    """Tokenizer files that are missing or inconsistent."""


def read_added_tokens(path: str) -> dict[str, int]:
    """{token: id} of the added tokens of a tokenizer directory (tokenizer.json and/or added_tokens.json)."""
    added: dict[str, int] = {}
    tj = os.path.join(path, "tokenizer.json")
    if os.path.isfile(tj):
        with open(tj, encoding="utf-8") as f:
            for tok in json.load(f).get("added_tokens", []):
                added[tok["content"]] = tok["id"]
    aj = os.path.join(path, "added_tokens.json")
    if os.path.isfile(aj):
        with open(aj, encoding="utf-8") as f:
            added.update(json.load(f))
    return added


def _compile_template(source: str) -> jinja2.Template:
    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env.from_string(source)


class NVILATokenizer:
    """Tokenizer + chat template + the ids NVILA needs (media tokens, stop tokens, "\\n")."""

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        chat_template: str | None = None,
        special_tokens: Mapping[str, str | None] | None = None,
        model_max_length: int | None = None,
    ) -> None:
        self.backend = tokenizer
        self.chat_template = chat_template or DEFAULT_CHAT_TEMPLATE
        self.special_tokens = dict(special_tokens or {})
        self.model_max_length = model_max_length
        self._template = _compile_template(self.chat_template)

    # ----------------------------------------------------------------------------- loading
    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> "NVILATokenizer":
        """Loads tokenizer.json + tokenizer_config.json (chat template, eos/pad tokens) from `path`."""
        path = os.fspath(path)
        tj = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tj):
            raise TokenizerError(
                f"{path}: no tokenizer.json (a fast tokenizer); convert the checkpoint with `nvila-jax convert`, "
                "which builds it from vocab.json + merges.txt"
            )
        try:
            backend = tokenizers.Tokenizer.from_file(tj)
        except Exception as e:  # the tokenizers library raises its own exception types
            raise TokenizerError(f"{tj}: cannot be read as a tokenizer ({e})") from None
        cfg: dict[str, Any] = {}
        cj = os.path.join(path, "tokenizer_config.json")
        if os.path.isfile(cj):
            with open(cj, encoding="utf-8") as f:
                cfg = json.load(f)
        template = cfg.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            template = next((t["template"] for t in template if t.get("name") == "default"), template[0]["template"])
        jinja_file = os.path.join(path, "chat_template.jinja")
        if template is None and os.path.isfile(jinja_file):
            with open(jinja_file, encoding="utf-8") as f:
                template = f.read()
        special = {k: _token_content(cfg.get(k)) for k in ("eos_token", "pad_token", "bos_token")}
        max_len = cfg.get("model_max_length")
        return cls(backend, template, special, int(max_len) if isinstance(max_len, (int, float)) and max_len < 1e9
                   else None)

    def save(self, path: str | os.PathLike) -> None:
        """Writes tokenizer.json and tokenizer_config.json (with the chat template) into `path`."""
        path = os.fspath(path)
        os.makedirs(path, exist_ok=True)
        self.backend.save(os.path.join(path, "tokenizer.json"))
        cfg = {k: v for k, v in self.special_tokens.items() if v is not None}
        cfg.update(chat_template=self.chat_template, tokenizer_class="Qwen2TokenizerFast")
        if self.model_max_length:
            cfg["model_max_length"] = self.model_max_length
        with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(cfg, f, indent=2, ensure_ascii=False)

    # ----------------------------------------------------------------------------- text <-> ids
    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Ids of `text` as HF `tokenizer(text).input_ids` gives them."""
        return self.backend.encode(text).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str) -> int:
        tid = self.backend.token_to_id(token)
        if tid is None:
            raise TokenizerError(f"token {token!r} is not in the tokenizer's vocabulary")
        return tid

    def apply_chat_template(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = False) -> str:
        return self._template.render(
            messages=list(messages),
            add_generation_prompt=add_generation_prompt,
            **{k: v for k, v in self.special_tokens.items() if v is not None},
        )

    # ----------------------------------------------------------------------------- NVILA ids
    @property
    def image_token_id(self) -> int:
        return self.token_id(IMAGE_TOKEN)

    @property
    def video_token_id(self) -> int:
        return self.token_id(VIDEO_TOKEN)

    @property
    def eos_token_id(self) -> int | None:
        eos = self.special_tokens.get("eos_token")
        return self.backend.token_to_id(eos) if eos else None

    @property
    def pad_token_id(self) -> int:
        """Padding id: pad token, else eos, else 0 (padding positions are masked anyway)."""
        for name in ("pad_token", "eos_token"):
            tok = self.special_tokens.get(name)
            if tok and self.backend.token_to_id(tok) is not None:
                return self.backend.token_to_id(tok)
        return 0

    @cached_property
    def stop_token_ids(self) -> tuple[int, ...]:
        """eos plus the token the template puts right after an assistant turn (`<|im_end|>` for Qwen2)."""
        stops = set()
        if self.eos_token_id is not None:
            stops.add(self.eos_token_id)
        sentinel = self.backend.token_to_id(SENTINEL_TOKEN)
        if sentinel is not None:
            convo = [{"role": "user", "content": "question"}, {"role": "assistant", "content": SENTINEL_TOKEN}] * 2
            ids = self.encode(self.apply_chat_template(convo))
            stops.update(ids[k + 1] for k in range(len(ids) - 1) if ids[k] == sentinel)
        return tuple(sorted(stops))

    @cached_property
    def special_ids(self) -> frozenset[int]:
        """Ids of all special added tokens (skipped when decoding)."""
        return frozenset(i for i, t in self.backend.get_added_tokens_decoder().items() if t.special)


def _token_content(tok: Any) -> str | None:
    if isinstance(tok, Mapping):
        return tok.get("content")
    return tok
