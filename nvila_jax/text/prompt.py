"""Prompt construction as the reference's `generate_content`: media tokens first in the user turn, then the
text; the tokenizer's chat template with its default system prompt; the generation prompt appended."""

from __future__ import annotations

import warnings

from nvila_jax.text.tokenizer import IMAGE_TOKEN, VIDEO_TOKEN, NVILATokenizer


def clean_user_text(text: str) -> str:
    """Literal media tokens typed in the text are removed (with a warning), as the reference does."""
    for token in (IMAGE_TOKEN, VIDEO_TOKEN):
        if token in text:
            warnings.warn(f"media token {token!r} found in the prompt text; removed (pass media as images/video)")
            text = text.replace(token, "").strip()
    return text


def media_text(num_image_tokens: int, has_video: bool, newline_after_images: bool) -> str:
    """The media part of the user turn. NVILA-Lite's single tiled image puts "<image>\\n" per tile."""
    image = IMAGE_TOKEN + ("\n" if newline_after_images else "")
    return image * num_image_tokens + (VIDEO_TOKEN if has_video else "")


def prompt_ids(tokenizer: NVILATokenizer, text: str, media: str = "") -> list[int]:
    """Token ids of a single-turn chat ending with the assistant generation prompt."""
    content = (media + clean_user_text(text)).strip()
    chat = tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    return tokenizer.encode(chat)
