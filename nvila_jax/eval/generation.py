"""The runner's view of a model: a `generate_batch(requests) -> list[str]` callable over the inference
engine's GenerationRequest. `model_generator` builds it from an NVILAModel (its batched, bucketed
`generate_batch`); tests and users can pass any callable with the same contract."""

from __future__ import annotations

import io
from typing import Any, Callable, Sequence

import PIL.Image

from nvila_jax.eval.tasks.base import Sample
from nvila_jax.inference.batch import GenerationRequest
from nvila_jax.inference.sampling import SamplingParams

GenerateBatch = Callable[[Sequence[GenerationRequest]], list[str]]


def sample_request(sample: Sample, max_new_tokens: int) -> GenerationRequest:
    """The greedy generation request of a sample (images stored as bytes in a data file are decoded)."""
    images = [PIL.Image.open(io.BytesIO(im)) if isinstance(im, bytes) else im for im in sample.images]
    return GenerationRequest(sample.prompt, images, sample.video, sample.num_frames,
                             SamplingParams(max_new_tokens=max_new_tokens))


def model_generator(model: Any) -> GenerateBatch:
    """Answers from `model.generate_batch`, the whole list as one batch (grouped by the engine's buckets)."""

    def generate(requests: Sequence[GenerationRequest]) -> list[str]:
        return [g.text for g in model.generate_batch(list(requests), max_batch_size=len(requests))]

    return generate
