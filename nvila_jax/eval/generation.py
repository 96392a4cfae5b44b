"""The runner's view of a model: a `generate_batch(requests) -> list[str]` callable.

The runner only needs answers for a list of requests; `model_generator` builds that callable from an
NVILAModel, using its batched generation when the model has one (`generate_batch`) and one request at a
time otherwise. Tests and users can pass any callable with the same contract.
"""

from __future__ import annotations

import dataclasses
import io
from typing import Any, Callable, Sequence

import PIL.Image

from nvila_jax.eval.tasks.base import ImageSource, Sample


@dataclasses.dataclass(frozen=True)
class GenerationRequest:
    """One greedy generation: a user prompt with its media, as `NVILAModel.generate` takes it."""

    prompt: str
    images: tuple[ImageSource, ...] = ()
    video: str | None = None
    num_frames: int | None = None
    max_new_tokens: int = 64

    @classmethod
    def from_sample(cls, sample: Sample, max_new_tokens: int) -> "GenerationRequest":
        return cls(sample.prompt, sample.images, sample.video, sample.num_frames, max_new_tokens)

    def image_inputs(self) -> list[Any]:
        """Paths as they are, embedded image bytes decoded to PIL images."""
        return [PIL.Image.open(io.BytesIO(im)) if isinstance(im, bytes) else im for im in self.images]


GenerateBatch = Callable[[Sequence[GenerationRequest]], list[str]]


def model_generator(model: Any) -> GenerateBatch:
    """A generate_batch callable for an NVILAModel (or anything with the same `generate` / `generate_batch`)."""
    if hasattr(model, "generate_batch"):
        def batched(requests: Sequence[GenerationRequest]) -> list[str]:
            return list(model.generate_batch([
                dict(prompt=r.prompt, images=r.image_inputs(), video=r.video, num_frames=r.num_frames,
                     max_new_tokens=r.max_new_tokens) for r in requests]))

        return batched

    def one_by_one(requests: Sequence[GenerationRequest]) -> list[str]:
        return [model.generate(r.prompt, images=r.image_inputs(), video=r.video, num_frames=r.num_frames,
                               max_new_tokens=r.max_new_tokens) for r in requests]

    return one_by_one
