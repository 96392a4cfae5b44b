"""`nvila-jax train`: the training loop around the pure train step.

Resumes automatically from DIR/checkpoints (parameters, optimizer state, step, RNG, the data iterator
state and run counters), so a run killed at any point and restarted writes the same metrics.jsonl as an
uninterrupted one (bit-exact on CPU; tests/test_resume.py). SIGTERM (preemption) saves a checkpoint at the
end of the current step and exits with status 143.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from nvila_jax.config import NVILAConfig
from nvila_jax.data import synthetic
from nvila_jax.data.mixture import DatasetSpec, Mixture, load_mixture
from nvila_jax.data.packing import PackingOptions, StepBatch, VisualGeometry
from nvila_jax.data.pipeline import DevicePrefetch, build_pipeline
from nvila_jax.data.sample import SKIP_REASONS, SampleOptions, load_tokenizer
from nvila_jax.kernels import fp8
from nvila_jax.models.nvila import NVILA, init_params
from nvila_jax.text.tokenizer import NVILATokenizer
from nvila_jax.train import flops as flops_lib
from nvila_jax.train.checkpoint import Checkpointer, restore_params
from nvila_jax.train.config import RunConfigError, fp8_config, model_config
from nvila_jax.train.metrics import MetricsLogger
from nvila_jax.train.optimizer import make_optimizer
from nvila_jax.train.step import TrainState, init_fp8_meta, init_train_state, make_train_step

PREEMPTED_EXIT = 143
CHECKPOINT_DIR = "checkpoints"
MODEL_DIR = "model"


@dataclasses.dataclass
class RunSetup:
    """Everything a run (or an evaluation of its data) needs, derived from the config."""

    config: ml_collections.ConfigDict
    model_config: NVILAConfig
    tokenizer: NVILATokenizer
    mixture: Mixture
    sample_options: SampleOptions
    packing: PackingOptions

    @property
    def geometry(self) -> VisualGeometry:
        return VisualGeometry.from_config(self.model_config)


def tokenizer_spec(cfg: ml_collections.ConfigDict) -> str:
    """config.tokenizer, or when empty the tokenizer of init_from (a model directory or a run's model/)."""
    if cfg.tokenizer:
        return cfg.tokenizer
    if not cfg.init_from:
        raise RunConfigError("config.tokenizer is empty and there is no init_from to take the tokenizer from")
    run_model = os.path.join(cfg.init_from, MODEL_DIR)
    return os.path.join(run_model if os.path.isdir(run_model) else cfg.init_from, "tokenizer")


def setup_run(cfg: ml_collections.ConfigDict, workdir: str) -> RunSetup:
    mcfg = model_config(cfg)
    cfg.tokenizer = tokenizer_spec(cfg)
    tok = load_tokenizer(cfg.tokenizer)
    if (mcfg.image_token_id, mcfg.video_token_id) != (tok.image_token_id, tok.video_token_id):
        raise RunConfigError(f"the tokenizer's media token ids {(tok.image_token_id, tok.video_token_id)} differ from "
                             f"the model config's {(mcfg.image_token_id, mcfg.video_token_id)}")
    if len(tok) > mcfg.llm.vocab_size:
        raise RunConfigError(f"the tokenizer has {len(tok)} tokens but the model only {mcfg.llm.vocab_size} rows")
    d = cfg.data
    if d.mixture == "synthetic":
        path = synthetic.write_dataset(os.path.join(workdir, "data", "synthetic"), d.synthetic_records,
                                       d.synthetic_seed)
        mixture = Mixture((DatasetSpec("synthetic", path, os.path.dirname(path)),))
    else:
        mixture = load_mixture(d.mixture)
    if d.seq_len > mcfg.model_max_length:
        raise RunConfigError(f"data.seq_len={d.seq_len} exceeds the model's context {mcfg.model_max_length}")
    buckets = tuple(sorted(int(b) for b in d.tile_buckets))
    packing = PackingOptions(rows=d.rows_per_batch, seq_len=d.seq_len, tile_buckets=buckets,
                             accumulation=d.accumulation, group_steps=d.group_steps, pad_id=tok.pad_token_id)
    options = SampleOptions(max_length=d.seq_len, max_tiles=max(buckets), image_policy=d.image_policy,
                            num_video_frames=d.num_video_frames or None)
    return RunSetup(cfg, mcfg, tok, mixture, options, packing)


def data_iterator(run: RunSetup, seed: int, shuffle: bool = True, repeat: bool = True, sharded: bool = True):
    """The run's step iterator. `sharded`: this process reads its share of the global order (its own
    batches); otherwise every process reads the same batches (a mesh spanning processes)."""
    d = run.config.data
    index, count = (jax.process_index(), jax.process_count()) if sharded else (0, 1)
    return iter(build_pipeline(run.mixture, run.model_config, run.config.tokenizer, run.sample_options,
                               run.packing, seed=seed, process_index=index, process_count=count,
                               num_workers=d.num_workers, read_threads=d.read_threads, shuffle=shuffle,
                               repeat=repeat))


class Placement:
    """Where the run's arrays live: one device, or a mesh (parameters and Adam moments split by the logical
    rules table, each step's rows and tiles over the batch axes). With several processes every process
    reads the same global batches (see docs/training.md)."""

    def __init__(self, spec: str, mcfg: NVILAConfig, tx: Any):
        self.mcfg, self.tx = mcfg, tx
        self.mesh = None
        if spec:
            from nvila_jax import sharding

            self.mesh = sharding.make_mesh(spec)
        elif jax.process_count() > 1:
            raise RunConfigError(f"{jax.process_count()} processes need a device mesh: set config.mesh "
                                 "(e.g. --config.mesh=fsdp=-1)")

    def state_like(self, like: Any) -> Any:
        """The abstract train state with the shardings it lives in (restore targets)."""
        if self.mesh is None:
            return like
        from nvila_jax import sharding

        shardings = sharding.train_state_shardings(like, self.mcfg, self.mesh, self.tx)
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), like, shardings)

    def put_state(self, state: TrainState) -> TrainState:
        if self.mesh is None:
            return state
        return jax.device_put(state, jax.tree.map(lambda a: a.sharding, self.state_like(state)))

    def put_batch(self, batch: StepBatch) -> dict[str, jax.Array]:
        if self.mesh is None:
            return {k: jnp.asarray(v) for k, v in batch.arrays.items()}
        from nvila_jax import sharding

        shardings = sharding.step_batch_shardings(self.mesh, batch.arrays)
        return {k: jax.make_array_from_callback(v.shape, shardings[k], lambda idx, v=v: v[idx])
                for k, v in batch.arrays.items()}

    def jit_step(self, step: Any, state_like: Any) -> Any:
        if self.mesh is None:
            return jax.jit(step, donate_argnums=0)
        from nvila_jax import sharding

        ssh = jax.tree.map(lambda a: a.sharding, state_like)
        return jax.jit(step, out_shardings=(ssh, sharding.replicated(self.mesh)), donate_argnums=0)

    def activate(self):
        import contextlib

        if self.mesh is None:
            return contextlib.nullcontext()
        from nvila_jax import sharding

        return sharding.activate(self.mesh)


def initial_params(cfg: ml_collections.ConfigDict, mcfg: NVILAConfig, like: Any = None) -> Any:
    """Random parameters (seed), or the previous stage's: a training workdir or an nvila_jax model directory.
    `like`: abstract parameters whose shardings say where each array goes (default: one device)."""
    if like is None:
        like = jax.eval_shape(lambda: nn.meta.unbox(init_params(mcfg, jax.random.key(cfg.seed))))
    src = cfg.init_from
    if not src:
        init = lambda: nn.meta.unbox(init_params(mcfg, jax.random.key(cfg.seed)))
        placed = all(getattr(a, "sharding", None) is not None for a in jax.tree.leaves(like))
        return jax.jit(init, out_shardings=jax.tree.map(lambda a: a.sharding, like) if placed else None)()
    if not os.path.isdir(src):
        raise RunConfigError(f"config.init_from={src!r}: no such directory")
    if os.path.isdir(os.path.join(src, CHECKPOINT_DIR)):
        params, _ = restore_params(os.path.join(src, CHECKPOINT_DIR), like)
    else:
        from nvila_jax.checkpoint import restore_params as restore_model_params

        params = restore_model_params(src, like)
    got = jax.tree.map(lambda x: (x.shape, str(x.dtype)), params)
    want = jax.tree.map(lambda x: (x.shape, str(x.dtype)), like)
    if got != want:
        raise RunConfigError(f"config.init_from={src!r}: its parameters do not match the model {cfg.model!r}")
    return params


def export_model(directory: str, mcfg: NVILAConfig, params: Any, tokenizer: NVILATokenizer) -> None:
    """An nvila_jax model directory (config.json, params/, tokenizer/) readable by `load_pretrained`."""
    import orbax.checkpoint as ocp

    from nvila_jax.checkpoint import CONFIG_FILE, PARAMS_DIR, TOKENIZER_DIR, atomic_directory

    with atomic_directory(directory, overwrite=True) as tmp:
        with open(os.path.join(tmp, CONFIG_FILE), "w", encoding="utf-8") as f:
            f.write(mcfg.to_json())
        with ocp.StandardCheckpointer() as ckpt:
            ckpt.save(os.path.join(tmp, PARAMS_DIR), params)
        tokenizer.save(os.path.join(tmp, TOKENIZER_DIR))


class _Preemption:
    """SIGTERM sets a flag that the loop checks after every step."""

    def __init__(self):
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def restore(self) -> None:
        signal.signal(signal.SIGTERM, self._previous)


def _host_stats(batch: StepBatch) -> tuple[int, int, int]:
    """(samples, non-padding tokens, trained tokens) of a step on this process."""
    a = batch.arrays
    return batch.num_samples, int((a["segment_ids"] > 0).sum()), int((a["targets"] >= 0).sum())


def _opt_item(state: Any) -> dict[str, Any]:
    """What the checkpoint's "opt" item holds beside the parameters: optimizer state, step, RNG and, with
    delayed-scaling FP8, the amax histories (so a resumed run scales exactly as an uninterrupted one)."""
    item = {"step": state.step, "opt_state": state.opt_state, "rng": state.rng}
    if state.fp8_meta:
        item["fp8_meta"] = state.fp8_meta
    return item


def train(cfg: ml_collections.ConfigDict, workdir: str) -> int:
    """Runs (or resumes) training; returns the exit status (0 done, 143 preempted)."""
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    run = setup_run(cfg, workdir)
    mcfg, total = run.model_config, int(cfg.num_train_steps)
    primary = jax.process_index() == 0
    if primary:
        with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
            f.write(cfg.to_json(indent=2))

    fp8_options = fp8_config(cfg)
    module = NVILA(mcfg, dtype=jnp.dtype(cfg.compute_dtype), remat=cfg.remat,
                   llm_dot_general_cls=fp8.llm_dot_general_cls(fp8_options))
    fp8_meta = init_fp8_meta(module)
    trainable = tuple(cfg.trainable)
    like = jax.eval_shape(lambda: nn.meta.unbox(init_params(mcfg, jax.random.key(0))))
    tx, schedules = make_optimizer(
        like, trainable=trainable, learning_rate=cfg.learning_rate,
        module_learning_rates=cfg.module_learning_rates.to_dict(), total_steps=total,
        warmup_steps=int(round(cfg.warmup_ratio * total)), schedule=cfg.lr_schedule,
        weight_decay=cfg.weight_decay, b1=cfg.adam_b1, b2=cfg.adam_b2, eps=cfg.adam_eps,
        max_grad_norm=cfg.max_grad_norm or None)
    ckpt = Checkpointer(os.path.join(workdir, CHECKPOINT_DIR), cfg.save_every, cfg.keep_checkpoints,
                        cfg.async_checkpointing)
    placement = Placement(cfg.mesh, mcfg, tx)
    state_like = placement.state_like(jax.eval_shape(lambda: init_train_state(like, tx, cfg.seed, fp8_meta)))
    latest = ckpt.latest_step()
    counters = {"samples": 0, "tokens": 0, "trained_tokens": 0, "skipped": dict.fromkeys(SKIP_REASONS, 0)}
    data_state = None
    if latest is not None:
        params, opt, data_state, meta = ckpt.restore(latest, state_like.params, _opt_item(state_like))
        state = TrainState(step=opt["step"], params=params, opt_state=opt["opt_state"], rng=opt["rng"],
                           fp8_meta=opt.get("fp8_meta", {}))
        counters = meta["counters"]
        if primary:
            print(f"resumed from {ckpt.directory}/{latest} (step {latest})", flush=True)
    else:
        state = placement.put_state(init_train_state(initial_params(cfg, mcfg, state_like.params), tx, cfg.seed,
                                                     fp8_meta))
    start = int(state.step)
    if start >= total:
        ckpt.close()
        if primary:
            print(f"already trained {start} >= num_train_steps={total} steps", flush=True)
        return 0

    iterator = data_iterator(run, cfg.seed, sharded=placement.mesh is None)
    if data_state is not None:
        iterator.set_state(data_state)
    prefetch = DevicePrefetch(iterator, placement.put_batch, cfg.data.prefetch)
    step_fn = placement.jit_step(make_train_step(module, tx, run.geometry, trainable, schedules, cfg.loss_chunk),
                                 state_like)
    logger = MetricsLogger(workdir, total, start, enabled=primary)
    peak, peak_source = flops_lib.device_peak_flops(cfg.peak_tflops_per_device)
    if primary:
        n_params = sum(x.size for x in jax.tree.leaves(state.params))
        print(f"training {mcfg.name} ({n_params / 1e6:.2f}M parameters; trainable: {', '.join(trainable)}) "
              f"for {total} steps in {workdir}; MFU against {peak / 1e12:.3g} TFLOP/s ({peak_source})", flush=True)
        if fp8_options.enabled:
            print(fp8.describe(fp8_options), flush=True)
    preemption = _Preemption()
    status = 0
    window_flops, window_tokens, t_last = 0.0, 0, time.perf_counter()
    try:
        for step in range(start, total):
            device_batch, host_batch, data_state = next(prefetch)
            with placement.activate():
                state, metrics = step_fn(state, device_batch)
            samples, tokens, trained = _host_stats(host_batch)
            counters["samples"] += samples
            counters["tokens"] += tokens
            counters["trained_tokens"] += trained
            for reason, n in zip(SKIP_REASONS, host_batch.skipped):
                counters["skipped"][reason] += int(n)
            a = host_batch.arrays
            window_flops += flops_lib.step_flops(mcfg, a["input_ids"].shape[1], a["input_ids"].shape[2],
                                                 a["tiles"].shape[1], a["input_ids"].shape[0], trainable)
            window_tokens += tokens
            done = step + 1
            if done % cfg.log_every == 0 or done == total or preemption.requested:
                # The logged step's own loss (not a window mean), so a resumed run logs the same numbers.
                fetched = jax.device_get(metrics)
                elapsed = time.perf_counter() - t_last
                record = {
                    "loss": float(fetched["loss"]), "grad_norm": float(fetched["grad_norm"]),
                    **{k: float(v) for k, v in fetched.items() if k.startswith("lr/")},
                    "samples": counters["samples"], "trained_tokens": counters["trained_tokens"],
                    "tokens_per_s": window_tokens * jax.process_count() / elapsed,
                    "mfu": flops_lib.mfu(window_flops * jax.process_count(), elapsed, peak, jax.device_count()),
                    "skipped": sum(counters["skipped"].values()),
                }
                logger.log(done, record)
                logger.progress(done, record)
                window_flops, window_tokens, t_last = 0.0, 0, time.perf_counter()
            meta = {"counters": counters, "seed": cfg.seed}
            if preemption.requested:
                ckpt.save(done, state.params, _opt_item(state), data_state, meta, force=True)
                ckpt.wait()
                if primary:
                    print(f"preempted: saved step {done} to {ckpt.directory}", flush=True)
                status = PREEMPTED_EXIT
                break
            ckpt.save(done, state.params, _opt_item(state), data_state, meta, force=done == total)
        if status == 0:
            ckpt.wait()
            from nvila_jax.distributed import to_host

            params = jax.tree.map(to_host, state.params)  # every process takes part in the gather
            if primary:
                export_model(os.path.join(workdir, MODEL_DIR), mcfg, params, run.tokenizer)
                skipped = {k: v for k, v in counters["skipped"].items() if v}
                print(f"done: {total} steps, {counters['samples']} samples; skipped records: {skipped or 'none'}; "
                      f"model in {os.path.join(workdir, MODEL_DIR)}", flush=True)
    finally:
        preemption.restore()
        prefetch.close()
        ckpt.close()
        logger.close()
    return status
