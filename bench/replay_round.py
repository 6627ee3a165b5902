"""A screen without the web page: a finished learning-curve run's ratings, trained on again by the worker's
own round code with other options, then judged on the held-out prompts as `bench/learning_curve.py` judges.

    python bench/replay_round.py RUN_DIR [--rounds 3] [--samples 3] [-- worker options, e.g. --objective dpo]

RUN_DIR is a `bench/learning_curve.py --out` folder (its `report.json` names the taste and model, its
`feedback.db` holds the ratings). A copy of the store is trained on from the base model: `--rounds`
times `Worker.prepare` (all feedback; the reward model fitted and judged, or a direct objective's
examples) then `Worker.train`, nothing published. The base model and the trained policy are then sampled
on the held-out prompts with the same seeds (`evaluate_policy`). One JSON line last.

What it does not show: the online loop's rounds train on feedback growing with versions that the
raters saw (later pages come from better versions); a replay trains on the finished run's pages all at
once. Use it to screen objectives and options fast (minutes, not a whole run), then confirm the chosen
ones with `bench/learning_curve.py`.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.learning_curve import base_dtype_of, evaluate_policy, held_out_prompts  # noqa: E402
from bench.load import split_at_dashes  # noqa: E402


@contextmanager
def worker_on_copy(run_dir: Path, run: dict, options: list[str]) -> Iterator[tuple]:
    """Yield `build_worker`'s (Worker, SamplingConfig) on a temporary copy of the run's store, so the run's own
    folder is never written; the copy and its adapters go when the block ends."""
    with tempfile.TemporaryDirectory() as scratch:
        db = Path(scratch) / "feedback.db"
        shutil.copy(run_dir / "feedback.db", db)
        yield build_worker(run, db, Path(scratch) / "adapters", options)


def measuring_options(run_dir: Path, run: dict) -> list[str]:
    """Return the worker options that measure a run's versions as its app sampled them: `--max-new-tokens 24`
    as the bench samples, the base in the dtype the run's app loaded it (`base_dtype_of`)."""
    return ["--max-new-tokens", "24", "--dtype", base_dtype_of(run, run_dir, run.get("settings", {}))]


def build_worker(run: dict, db: Path, adapters: Path, options: list[str]):
    """Return a Worker on a copy of the run's store, with the worker's parser reading `options`."""
    import torch

    from db import FeedbackStore
    from ppo_feedback.adapters import AdapterStore
    from ppo_feedback.config import (LoraSettings, ModelConfig, ObjectiveConfig, RewardConfig, SamplingConfig,
                                     WorkerConfig, from_namespace)
    from ppo_feedback.modeling import add_lora, load_model
    from ppo_feedback.policy import PolicyWithValueHead
    from ppo_feedback.worker import Worker, build_parser, ppo_config_from

    args = build_parser().parse_args(["--model", run["model"], "--device", "cpu", "--db", str(db),
                                      "--adapters-dir", str(adapters), "--max-new-tokens",
                                      str(run.get("max_new_tokens", 24)), *options])
    model_cfg, lora, sampling = (from_namespace(cls, args) for cls in (ModelConfig, LoraSettings, SamplingConfig))
    ppo_config = ppo_config_from(args, sampling)
    loaded = load_model(model_cfg)
    torch.manual_seed(ppo_config.seed)
    policy = PolicyWithValueHead(add_lora(loaded.model, lora), loaded.tokenizer)
    worker = Worker(FeedbackStore(db), AdapterStore(adapters), policy, ppo_config, from_namespace(WorkerConfig, args),
                    loaded.spec, reward_config=from_namespace(RewardConfig, args),
                    objective=from_namespace(ObjectiveConfig, args))
    return worker, sampling


def main(argv: list[str] | None = None) -> int:
    argv, options = split_at_dashes(argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a bench/learning_curve.py --out folder")
    parser.add_argument("--rounds", type=int, default=3, help="rounds trained on all of the run's feedback")
    parser.add_argument("--samples", type=int, default=3, help="held-out samples per prompt")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    import torch

    from db.records import Cursor
    from simulator.raters import parse_preference
    from simulator.report import t_interval

    torch.set_num_threads(args.threads)
    run = json.loads((args.run / "report.json").read_text())
    preference, prompts = parse_preference(run["preference"]), held_out_prompts()
    started = time.perf_counter()
    with worker_on_copy(args.run, run, options) as (worker, sampling):
        judge = dict(samples=args.samples, max_new_tokens=sampling.max_new_tokens,
                     temperature=sampling.temperature, top_p=sampling.top_p)
        base = evaluate_policy(worker.policy, prompts, preference, **judge)
        while not worker.hold_lease():  # rounds record their metrics under the training lease, as the worker's do
            print("waiting for the copied store's training lease to expire")
        trained_s, stats = time.perf_counter(), {}
        for i in range(args.rounds):
            plan = worker.prepare(Cursor())  # from the start: all feedback
            if plan.wait_reason is not None:
                print(f"round {i + 1}: {plan.wait_reason}")
                break
            stats = worker.train(plan)
            print(f"round {i + 1}: " + ", ".join(f"{k} {v:.4g}" for k, v in sorted(stats.items())
                                                 if k.startswith(("loss/", "objective/", "direct/"))), flush=True)
        trained_s = time.perf_counter() - trained_s
        worker.drop_lease()
        new = evaluate_policy(worker.policy, prompts, preference, **judge)
        worker.store.close()
    difference, half = t_interval([b - a for a, b in zip(base["per_prompt"], new["per_prompt"])])
    kl, kl_half = t_interval(new["kl"])
    result = {"bench": "replay_round", "run": str(args.run), "preference": run["preference"], "options": options,
              "rounds": args.rounds, "base": round(sum(base["per_prompt"]) / len(prompts), 4),
              "trained": round(sum(new["per_prompt"]) / len(prompts), 4),
              "difference": round(difference, 4), "ci95": round(half, 4), "kl": round(kl, 3),
              "perplexity_ratio": round(new["base_perplexity"] / base["base_perplexity"], 3),
              "distinct_bigram_ratio": round(new["distinct_bigrams"] / base["distinct_bigrams"], 3),
              "train_s": round(trained_s), "total_s": round(time.perf_counter() - started),
              "examples": [t[:80] for t in new["examples"][:3]]}
    print(f"held-out {result['base']:.3f} -> {result['trained']:.3f}: {difference:+.3f} ± {half:.3f}; KL {kl:.2f}; "
          f"perplexity x{result['perplexity_ratio']}; distinct-2 x{result['distinct_bigram_ratio']}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
