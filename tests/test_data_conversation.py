"""Label masking and prompt construction of training examples vs a transcription of the reference
(`LLaVADataset.process`, `extract_media`, `tokenize_conversation`, `preprocess_conversation`), run with the
HF tokenizer, plus hand-checked examples."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from nvila_jax.data.conversation import IGNORE, Turn, chat_messages, media_prefix, supervised_labels

SENTINEL = "<vila/sentinel>"


# ------------------------------------------------------------------ transcription of the reference (torch + HF)
def ref_process(conversations, n_images: int, has_video: bool, lite_tiles=None):
    """LLaVADataset.process + extract_media (+ dynamic_process_images_and_prompt for NVILA-Lite tiles)."""
    messages = [dict(m) for m in conversations]
    for m in messages:
        m["value"] = m["value"].replace("<image>", "").strip()
    if has_video:
        for m in messages:
            m["value"] = m["value"].replace("<video>", "").strip()
    text = messages[0]["value"]
    for token in ("<image>", "<vila/video>"):
        if token in text:
            text = text.replace(token, "").strip()
    messages[0]["value"] = "<image>" * n_images + ("<vila/video>" if has_video else "") + text
    for m in messages[1:]:
        for token in ("<image>", "<vila/video>"):
            if token in m["value"]:
                m["value"] = m["value"].replace(token, "").strip()
    if lite_tiles is not None:
        parts = messages[0]["value"].split("<image>")
        idx = 0
        for n in lite_tiles:
            parts.insert(idx + 1, "<image>\n" * n)
            idx += 2
        messages[0]["value"] = "".join(parts)
    return messages


def ref_tokenize_conversation(messages, tokenizer, overrides=None, no_system_prompt=False):
    for message in messages:
        message["value"] = message["value"].strip()
    conversation = []
    for m in messages:
        role = {"human": "user", "gpt": "assistant"}[m["from"]]
        content = m["value"]
        if overrides is not None and m["from"] in overrides:
            content = overrides[m["from"]]
        conversation.append({"role": role, "content": content})
    if no_system_prompt:
        conversation = [{"role": "system", "content": ""}] + conversation
    text = tokenizer.apply_chat_template(conversation, add_generation_prompt=False, tokenize=False)
    return torch.tensor(tokenizer(text).input_ids)


def ref_preprocess_conversation(conversation, tokenizer, no_system_prompt=False, retried=False):
    inputs = ref_tokenize_conversation(conversation, tokenizer, no_system_prompt=no_system_prompt)
    labels = torch.ones_like(inputs) * -100
    sentinel_id = tokenizer.convert_tokens_to_ids(SENTINEL)
    template = ref_tokenize_conversation(conversation, tokenizer, overrides={"gpt": SENTINEL},
                                         no_system_prompt=no_system_prompt)
    mask = torch.ones_like(template, dtype=torch.bool)
    for k in range(template.size(0) - 1):
        if template[k] == sentinel_id:
            mask[k:k + 2] = False
            if k > 0 and retried:
                mask[k - 1] = False
    template = template[mask]
    p = 0
    for k in range(inputs.size(0)):
        if p < template.size(0) and inputs[k] == template[p]:
            p += 1
        else:
            labels[k] = inputs[k]
    if p < template.size(0):
        if not retried:
            return ref_preprocess_conversation(conversation, tokenizer, no_system_prompt, retried=True)
        labels[:] = -100
    return inputs.numpy(), labels.numpy()


@pytest.fixture(scope="module")
def hf_tok(tokenizer_dir):
    from helpers.torch_nvila import hf_tokenizer

    return hf_tokenizer(tokenizer_dir)


def ours(tok, conversations, n_images=0, has_video=False, no_system_prompt=False, lite_tiles=None):
    turns = [Turn(m["from"], m["value"]) for m in conversations]
    n_tokens = sum(lite_tiles) if lite_tiles is not None else n_images
    prefix = media_prefix(n_tokens, has_video, newline_after_images=lite_tiles is not None)
    return supervised_labels(tok, chat_messages(turns, prefix, no_system_prompt))


def convo(*pairs):
    out = []
    for q, a in pairs:
        out += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    return out


WORDS = ("red", "circle", "What", "color", "is", "the", "?", ".", "How", "many", "two", "left", "Answer", "\n",
         " ", "  ", "<image>", "yes", "no", "!", "123", "shapes", ",", "a")


def random_text(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(WORDS) + rng.choice(("", " ")) for _ in range(n))


@pytest.mark.parametrize("seed", range(40))
def test_labels_equal_reference_transcription(seed, tiny_tokenizer, hf_tok):
    rng = random.Random(seed)
    pairs = [(random_text(rng, rng.randint(1, 8)), random_text(rng, rng.randint(0, 6)))
             for _ in range(rng.randint(1, 4))]
    conv = convo(*pairs)
    if rng.random() < 0.2:
        conv = conv[:-1]  # ends with a human turn: nothing after it is trained
    n_images = rng.choice((0, 0, 1, 2, 3))
    has_video = n_images == 0 and rng.random() < 0.4
    no_sys = rng.random() < 0.5
    lite = [rng.randint(1, 5) for _ in range(n_images)] if n_images and rng.random() < 0.3 else None
    ids, labels = ours(tiny_tokenizer, conv, n_images, has_video, no_sys, lite)
    ref_ids, ref_labels = ref_preprocess_conversation(ref_process(conv, n_images, has_video, lite), hf_tok, no_sys)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_array_equal(labels, ref_labels)


def supervised_text(tok, ids, labels) -> list[str]:
    """Decoded runs of consecutive supervised tokens."""
    runs, cur = [], []
    for i, l in zip(ids, labels):
        if l != IGNORE:
            assert l == i
            cur.append(int(i))
        elif cur:
            runs.append(tok.decode(cur, skip_special_tokens=False))
            cur = []
    if cur:
        runs.append(tok.decode(cur, skip_special_tokens=False))
    return runs


def test_hand_checked_single_turn_with_image(tiny_tokenizer):
    ids, labels = ours(tiny_tokenizer, convo(("<image>\nWhat color is the circle?", "red")), n_images=1)
    text = tiny_tokenizer.decode(ids, skip_special_tokens=False)
    assert text == ("<|im_start|>system\nYou are a helpful assistant<|im_end|>\n<|im_start|>user\n<image>What color "
                    "is the circle?<|im_end|>\n<|im_start|>assistant\nred<|im_end|>\n")
    assert supervised_text(tiny_tokenizer, ids, labels) == ["red<|im_end|>"]
    assert labels[-1] == IGNORE  # the "\n" after <|im_end|> is not trained


def test_hand_checked_multi_turn_no_system_prompt_several_images(tiny_tokenizer):
    conv = convo(("How many shapes?<image>", "two"), ("Is it <image> red?", "yes, it is red."))
    ids, labels = ours(tiny_tokenizer, conv, n_images=2, no_system_prompt=True)
    text = tiny_tokenizer.decode(ids, skip_special_tokens=False)
    assert text.startswith("<|im_start|>system\n<|im_end|>\n<|im_start|>user\n<image><image>How many shapes?")
    assert "Is it  red?" in text  # media tokens are removed from later turns, spacing kept
    assert supervised_text(tiny_tokenizer, ids, labels) == ["two<|im_end|>", "yes, it is red.<|im_end|>"]


def test_hand_checked_video_and_lite_tiles(tiny_tokenizer):
    ids, labels = ours(tiny_tokenizer, convo(("<video>\nWhat is moving?", "the circle")), has_video=True)
    assert "<|im_start|>user\n<vila/video>What is moving?<|im_end|>" in tiny_tokenizer.decode(ids, False)
    assert supervised_text(tiny_tokenizer, ids, labels) == ["the circle<|im_end|>"]
    ids, _ = ours(tiny_tokenizer, convo(("<image>Describe", "ok")), n_images=1, lite_tiles=[3])
    assert "<|im_start|>user\n<image>\n<image>\n<image>\nDescribe<|im_end|>" in tiny_tokenizer.decode(ids, False)


def test_unmatched_template_masks_everything(tiny_tokenizer):
    """A template that changes the assistant text (so the sentinel is not in it) fails to match twice:
    the reference then masks every label."""
    from nvila_jax.text.tokenizer import NVILATokenizer

    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
                "{% if m['role'] == 'assistant' %}{{ m['content'] | upper }}{% else %}{{ m['content'] }}{% endif %}"
                "<|im_end|>\n{% endfor %}")
    tok = NVILATokenizer(tiny_tokenizer.backend, template, tiny_tokenizer.special_tokens)
    ids, labels = ours(tok, convo(("What color?", "red")))
    assert len(ids) and (labels == IGNORE).all()


def test_bad_conversations_are_rejected(tiny_tokenizer):
    from nvila_jax.data.conversation import ConversationError

    with pytest.raises(ConversationError, match="empty"):
        chat_messages([])
    with pytest.raises(ConversationError, match="unexpected speaker 'system'"):
        chat_messages([Turn("system", "x"), Turn("gpt", "y")])
