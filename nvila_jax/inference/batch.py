"""Many requests at once: validate and prepare them all up front, group prompts of similar length into
batches, run each batch through the engine, and return the answers in the caller's order."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

from nvila_jax.config import NVILAConfig
from nvila_jax.inference.engine import Engine, Generation
from nvila_jax.inference.request import Request, VideoLike, prepare_request
from nvila_jax.inference.sampling import SamplingParams
from nvila_jax.media.image import ImageLike
from nvila_jax.text.tokenizer import NVILATokenizer


@dataclasses.dataclass(frozen=True)
class GenerationRequest:
    """One prompt with its media. `sampling`, when given, replaces the call's settings for this request."""

    prompt: str
    images: Sequence[ImageLike] = ()
    video: VideoLike | None = None
    num_frames: int | None = None
    sampling: SamplingParams | None = None


RequestLike = GenerationRequest | Mapping[str, Any] | str


def as_generation_request(item: RequestLike, index: int) -> GenerationRequest:
    """Accepts a GenerationRequest, a dict with its fields, or a bare prompt string."""
    if isinstance(item, GenerationRequest):
        return item
    if isinstance(item, str):
        return GenerationRequest(item)
    if isinstance(item, Mapping):
        fields = {f.name for f in dataclasses.fields(GenerationRequest)}
        unknown = sorted(set(item) - fields)
        if unknown or "prompt" not in item:
            raise TypeError(f"request {index}: expected keys {sorted(fields)} with 'prompt' required, got "
                            f"{sorted(item)}")
        return GenerationRequest(**item)
    raise TypeError(f"request {index}: expected a GenerationRequest, dict or prompt string, got {type(item).__name__}")


def prepare_all(config: NVILAConfig, tokenizer: NVILATokenizer, requests: Sequence[GenerationRequest]) -> list[Request]:
    """Host preparation of every request before any device work, so a bad input fails fast; the error
    keeps its type and names the request."""
    prepared = []
    for i, r in enumerate(requests):
        try:
            prepared.append(prepare_request(config, tokenizer, r.prompt, r.images, r.video, r.num_frames))
        except ValueError as e:
            if len(requests) == 1:
                raise
            raise type(e)(f"request {i}: {e}") from e
    return prepared


def length_sorted_batches(lengths: Sequence[int], max_batch_size: int) -> list[list[int]]:
    """Request indices grouped into batches of similar prompt length (less left padding), longest first."""
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i:i + max_batch_size] for i in range(0, len(order), max_batch_size)]


def generate_batch(
    engine: Engine,
    params: Any,
    config: NVILAConfig,
    tokenizer: NVILATokenizer,
    requests: Sequence[RequestLike],
    sampling: SamplingParams,
    max_batch_size: int = 8,
    on_token: Callable[[int, int], None] | None = None,
) -> list[Generation]:
    """Answers for `requests` in their order. `on_token(request_index, token_id)` sees tokens as they come."""
    reqs = [as_generation_request(r, i) for i, r in enumerate(requests)]
    prepared = prepare_all(config, tokenizer, reqs)
    results: list[Generation | None] = [None] * len(reqs)
    for group in length_sorted_batches([p.length for p in prepared], max_batch_size):
        callback = None if on_token is None else (lambda row, tok, group=group: on_token(group[row], tok))
        settings = [reqs[i].sampling or sampling for i in group]
        tokens, reasons, stats = engine.generate(params, [prepared[i] for i in group], settings, callback)
        for row, i in enumerate(group):
            results[i] = Generation(
                token_ids=tokens[row],
                text=tokenizer.decode(tokens[row], skip_special_tokens=True).strip(),
                finish_reason=reasons[row],
                prompt_tokens=prepared[i].length,
                visual_tokens=prepared[i].fused.num_visual,
                vit_tiles=prepared[i].num_tiles,
                stats=stats,
            )
    return results
