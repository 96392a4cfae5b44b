"""Chat messages and training labels of a LLaVA-style conversation, as the reference builds them.

The reference (`LLaVADataset.process`, `extract_media`, `preprocess_conversation`; NVILA_REFERENCE.md §5)
strips media tokens from every turn, puts all media tokens at the front of the first turn, renders the chat
template and supervises exactly the tokens that a second rendering (assistant turns replaced by a sentinel
token) does not account for: the assistant's text and its end-of-turn token.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from nvila_jax.text.tokenizer import IMAGE_TOKEN, SENTINEL_TOKEN, VIDEO_TOKEN, NVILATokenizer

IGNORE = -100  # label of a token that is not trained (the reference's IGNORE_INDEX)
ROLES = {"human": "user", "gpt": "assistant"}


class ConversationError(ValueError):
    """A conversation that cannot be turned into a training example."""


@dataclasses.dataclass(frozen=True)
class Turn:
    speaker: str  # "human" or "gpt", as in LLaVA records
    text: str


def media_prefix(num_image_tokens: int, has_video: bool, newline_after_images: bool = False) -> str:
    """What the reference puts before the first turn's text: one `<image>` per image token (NVILA-Lite's
    training tiling writes `<image>\\n` per tile), then `<vila/video>`."""
    image = IMAGE_TOKEN + ("\n" if newline_after_images else "")
    return image * num_image_tokens + (VIDEO_TOKEN if has_video else "")


def _strip_media_tokens(text: str) -> str:
    """`process` removes `<image>` / `<video>` placeholders; `extract_media` removes media tokens left in text."""
    text = text.replace(IMAGE_TOKEN, "").replace("<video>", "").strip()
    for token in (IMAGE_TOKEN, VIDEO_TOKEN):
        if token in text:
            text = text.replace(token, "").strip()
    return text


def chat_messages(turns: Sequence[Turn], prefix: str = "", no_system_prompt: bool = False) -> list[dict[str, str]]:
    """Turns -> chat-template messages: media prefix in front of the first turn, every value stripped, an empty
    system message first for `no_system_prompt` datasets (the reference's `vflan_no_system_prompt`)."""
    if not turns:
        raise ConversationError("the conversation is empty")
    messages = [] if not no_system_prompt else [{"role": "system", "content": ""}]
    for i, turn in enumerate(turns):
        if turn.speaker not in ROLES:
            raise ConversationError(f"unexpected speaker {turn.speaker!r} in turn {i}; expected 'human' or 'gpt'")
        text = _strip_media_tokens(turn.text)
        if i == 0:
            text = prefix + text
        messages.append({"role": ROLES[turn.speaker], "content": text.strip()})
    return messages


def _render(tokenizer: NVILATokenizer, messages: Sequence[dict[str, str]], assistant: str | None = None) -> np.ndarray:
    if assistant is not None:
        messages = [dict(m, content=assistant) if m["role"] == "assistant" else m for m in messages]
    return np.asarray(tokenizer.encode(tokenizer.apply_chat_template(messages)), np.int32)


def supervised_labels(tokenizer: NVILATokenizer, messages: Sequence[dict[str, str]]) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, labels) of a conversation; labels are IGNORE except on the tokens the model is trained on.

    The sentinel method of the reference: render again with every assistant turn replaced by the sentinel,
    delete each sentinel and the token after it (the end-of-turn), then walk both sequences: tokens matched in
    order by the template are not trained, the others are. If the template does not match completely, the
    reference retries deleting also the token before each sentinel (tokenisation merges across the boundary),
    and if that fails too it masks every label.
    """
    sentinel = tokenizer.token_id(SENTINEL_TOKEN)
    ids = _render(tokenizer, messages)
    template = _render(tokenizer, messages, assistant=SENTINEL_TOKEN)
    for retried in (False, True):
        keep = np.ones(len(template), bool)
        for k in range(len(template) - 1):
            if template[k] == sentinel:
                keep[k:k + 2] = False
                if retried and k > 0:
                    keep[k - 1] = False
        pattern = template[keep]
        labels = np.full(len(ids), IGNORE, np.int32)
        p = 0
        for k, tok in enumerate(ids):
            if p < len(pattern) and tok == pattern[p]:
                p += 1
            else:
                labels[k] = tok
        if p == len(pattern):
            return ids, labels
    return ids, np.full(len(ids), IGNORE, np.int32)
