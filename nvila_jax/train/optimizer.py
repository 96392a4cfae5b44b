"""The optimizer: AdamW with warmup + cosine, global-norm clipping, per-module learning rates and frozen
modules, all through one `optax.multi_transform` over the parameter tree {"vision_tower", "projector", "llm"}.

Frozen modules get `optax.set_to_zero()` (no optimizer state) and the train step never differentiates them,
so freezing costs neither gradient nor Adam memory. Weight decay skips 1-D parameters (biases, norm scales),
as the HF Trainer the reference uses does.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import optax

MODULES = ("vision_tower", "projector", "llm")
FROZEN = "frozen"


def lr_schedule(peak: float, total_steps: int, warmup_steps: int, kind: str = "cosine") -> optax.Schedule:
    """Linear warmup from 0, then cosine to 0 (HF `get_cosine_schedule_with_warmup`) or constant."""
    if kind == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, peak, warmup_steps, max(total_steps, warmup_steps + 1), 0.0)
    if kind == "constant":
        return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup_steps), optax.constant_schedule(peak)],
                                    [warmup_steps])
    raise ValueError(f"unknown lr schedule {kind!r}; expected 'cosine' or 'constant'")


def module_labels(params: Mapping[str, Any], trainable: Sequence[str]) -> dict[str, Any]:
    """The multi_transform label of every leaf: its top-level module name, or FROZEN."""
    unknown = set(trainable) - set(MODULES)
    if unknown:
        raise ValueError(f"unknown trainable modules {sorted(unknown)}; expected a subset of {MODULES}")
    return {name: jax.tree.map(lambda _, n=name: n if n in trainable else FROZEN, sub) for name, sub in params.items()}


def _decay_mask(params: Any) -> Any:
    return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(
    params: Mapping[str, Any],
    *,
    trainable: Sequence[str],
    learning_rate: float,
    module_learning_rates: Mapping[str, float | None] | None,
    total_steps: int,
    warmup_steps: int,
    schedule: str = "cosine",
    weight_decay: float = 0.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    max_grad_norm: float | None = None,
) -> tuple[optax.GradientTransformation, dict[str, optax.Schedule]]:
    """(optimizer, {module: lr schedule}) for the trainable modules; the others are frozen."""
    given = module_learning_rates or {}
    rates = {m: learning_rate if given.get(m) is None else given[m] for m in trainable}
    schedules = {m: lr_schedule(rates[m], total_steps, warmup_steps, schedule) for m in trainable}
    transforms: dict[str, optax.GradientTransformation] = {FROZEN: optax.set_to_zero()}
    for m in trainable:
        transforms[m] = optax.adamw(schedules[m], b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                                    mask=_decay_mask)
    tx = optax.multi_transform(transforms, module_labels(params, trainable))
    if max_grad_norm:
        tx = optax.chain(optax.clip_by_global_norm(max_grad_norm), tx)
    return tx, schedules
