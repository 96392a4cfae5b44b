"""A small byte-level BPE tokenizer in the Qwen2 style, for the tiny model of the tests and the demo.

It is trained (deterministically) on a built-in corpus of the words the demo's questions use, and has the
Qwen2 chat tokens and the NVILA media tokens as added special tokens at the end of the vocabulary, like a
converted official checkpoint. Nothing is downloaded.
"""

from __future__ import annotations

import itertools

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from nvila_jax.text.tokenizer import DEFAULT_CHAT_TEMPLATE, NVILA_TOKENS, NVILATokenizer

TINY_BASE_VOCAB = 384
TINY_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>") + NVILA_TOKENS
TINY_IDS = {tok: TINY_BASE_VOCAB + i for i, tok in enumerate(TINY_SPECIAL_TOKENS)}
TINY_VOCAB_SIZE = TINY_BASE_VOCAB + len(TINY_SPECIAL_TOKENS)

_WORDS = {
    "colors": "red green blue yellow purple orange white black gray pink brown cyan",
    "shapes": "circle square triangle star rectangle ellipse cross diamond shape shapes",
    "numbers": "zero one two three four five six seven eight nine ten eleven twelve",
    "places": "left right top bottom center upper lower middle corner side above below",
    "words": (
        "what which how many is are the a an there color of in image picture video frame object objects "
        "count where yes no answer question describe with word and this that it on at to you helpful "
        "assistant system user please bigger smaller larger size big small shown see do does first last "
        "before after moving moves from most more than less same different only single number"
    ),
}


def _corpus() -> list[str]:
    words = " ".join(_WORDS.values()).split()
    lines = [" ".join(words[i:] + words[:i]) for i in range(0, len(words), 7)]
    templates = ("How many {s} are there?", "What color is the {s}?", "Is there a {c} {s}?", "The {s} is {c}.")
    shapes, colors = _WORDS["shapes"].split(), _WORDS["colors"].split()
    lines += [t.format(s=s, c=c) for t, s, c in itertools.product(templates, shapes, colors)]
    lines += [" ".join(str(i) for i in range(100)), "Answer with one word. Answer the question using a single word."]
    return lines


def build_tiny_tokenizer() -> NVILATokenizer:
    """Trains the tiny BPE (same result every time) and wraps it with the default qwen2 chat template."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_BASE_VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    if tok.get_vocab_size() != TINY_BASE_VOCAB:
        raise RuntimeError(f"tiny BPE has {tok.get_vocab_size()} tokens, expected {TINY_BASE_VOCAB}")
    tok.add_special_tokens(list(TINY_SPECIAL_TOKENS))
    return NVILATokenizer(
        tok,
        DEFAULT_CHAT_TEMPLATE,
        {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None},
        model_max_length=4096,
    )
