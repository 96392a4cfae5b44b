"""`nvila-jax demo`: train the tiny NVILA from scratch on generated pictures of shapes, then ask it about
pictures it has never seen and compare its accuracy with chance. CPU, a few minutes."""

from __future__ import annotations

import argparse

COMMAND = "demo"
HELP = "train a tiny NVILA on synthetic shapes (CPU, minutes) and quiz it on unseen images"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", default=None, help="where the run goes (default: a new temporary directory)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: configs/tiny.py's)")
    p.add_argument("--questions", type=int, default=200, help="unseen questions to answer")
    p.add_argument("--seed", type=int, default=0)


def evaluate(model, questions) -> dict[str, tuple[int, int]]:
    """{question kind: (correct, asked)} of greedy one-word answers."""
    from nvila_jax.inference.batch import GenerationRequest

    requests = [GenerationRequest(qa.question, [img]) for img, qa in questions]
    answers = model.generate_batch(requests, max_new_tokens=4, max_batch_size=16)
    scores: dict[str, tuple[int, int]] = {}
    for (_, qa), gen in zip(questions, answers):
        ok = gen.text.strip().lower().rstrip(".") == qa.answer
        c, n = scores.get(qa.kind, (0, 0))
        scores[qa.kind] = (c + ok, n + 1)
    return scores, answers


def run(args: argparse.Namespace) -> int:
    import os
    import tempfile
    import time

    from nvila_jax.checkpoint import load_pretrained
    from nvila_jax.data import synthetic
    from nvila_jax.train.config import tiny_config
    from nvila_jax.train.loop import MODEL_DIR, train

    t0 = time.perf_counter()
    workdir = args.workdir or tempfile.mkdtemp(prefix="nvila_demo_")
    cfg = tiny_config()
    cfg.seed = args.seed
    cfg.data.synthetic_seed = args.seed
    if args.steps:
        cfg.num_train_steps = args.steps
    print(f"1/3  {cfg.data.synthetic_records} synthetic training images: coloured shapes, questions about colour, "
          f"shape, count and position (in {workdir}/data)", flush=True)
    print(f"2/3  training the tiny NVILA from scratch for {cfg.num_train_steps} steps on the CPU", flush=True)
    status = train(cfg, workdir)
    if status:
        return status
    print(f"3/3  answering {args.questions} questions about unseen images", flush=True)
    model = load_pretrained(os.path.join(workdir, MODEL_DIR))
    questions = synthetic.evaluation_set(args.questions, seed=10_000 + args.seed)
    scores, answers = evaluate(model, questions)
    for (_, qa), gen in list(zip(questions, answers))[:8]:
        mark = "ok " if gen.text.strip().lower().rstrip(".") == qa.answer else "   "
        print(f"     {mark} {qa.question:<44} expected {qa.answer:<8} answered {gen.text!r}")
    print(f"\n     {'question':<10} {'accuracy':>9} {'chance':>7}")
    total_c = total_n = 0
    chance_sum = 0.0
    for kind in synthetic.QUESTION_KINDS:
        c, n = scores.get(kind, (0, 0))
        chance = 1 / len(synthetic.ANSWER_OPTIONS[kind])
        total_c, total_n, chance_sum = total_c + c, total_n + n, chance_sum + chance * n
        print(f"     {kind:<10} {c / max(n, 1):>8.0%} {chance:>7.0%}   ({c}/{n})")
    print(f"     {'all':<10} {total_c / max(total_n, 1):>8.0%} {chance_sum / max(total_n, 1):>7.0%}   "
          f"({total_c}/{total_n})")
    print(f"\ndone in {time.perf_counter() - t0:.0f} s; run directory {workdir} "
          f"(loss curve: nvila-jax plot {workdir})")
    return 0
