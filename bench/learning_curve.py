"""The improvement curve: app + worker + simulated raters on the offline SmolLM2-135M, CPU only.

    python bench/learning_curve.py --preference keyword:you [--ratings 200] [--pace 40] \\
        [-- app/worker options, replacing DEFAULT_TRAINING (--wait-interval 1; the rest: the app's defaults)]

One command: starts `app.py` (which starts the worker with the same options), runs the simulated
raters (`simulator`, through the public API) with `--pace`, so the room waits after
every block of ratings until the worker published a version trained on it, then stops the app and
measures version 0 (the base model) against the newest version offline, on held-out prompts that
were never in the prompt pool:

- mean preference score (taste, 0..1) per prompt over `--samples` samples, then the mean over
  prompts with a 95% t interval, for both versions, and the paired difference with its interval;
- mean KL of the newest version to the base, per response: sum over tokens of log pi - log pi_ref
  (pi_ref = the same network with the adapter off, `PolicyWithValueHead.reference`);
- the base model's perplexity of the newest version's generations (and of its own, for scale).

Prints the curve (per version: ratings given so far, mean taste of its rated generations), the
held-out figures and one JSON line; writes the simulator's CSV and PNG under `--out`.
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.load import app_command, child_env, free_port, split_at_dashes, stop_process, wait_for_app  # noqa: E402
from ppo_feedback.config import LoraSettings, from_namespace  # noqa: E402

HELD_OUT_PROMPTS = [
    "Write a short poem about a mountain lake.",
    "Describe a walk in the park on a spring morning.",
    "What makes a good friend?",
    "Tell me about your favourite season.",
    "Write a postcard from a seaside town.",
    "Explain how plants grow.",
    "Describe a birthday party for a grandmother.",
    "Give advice to someone starting a new job.",
    "Write a short story about a dog who finds a ball.",
    "What is the best part of a summer holiday?",
    "Describe the view from a hilltop at sunrise.",
    "Write a note to a teacher at the end of the school year.",
    "How do bees make honey?",
    "Describe a market on a busy Saturday.",
    "Write a short song about the ocean.",
    "What do you like about music?",
    "Describe a cup of hot chocolate on a cold day.",
    "Tell a story about a child and a kite.",
    "What should I cook for dinner tonight?",
    "Write a welcome message for a new neighbour.",
    "Describe a train journey through the countryside.",
    "Explain why people keep diaries.",
    "Write a few lines about a rainy afternoon.",
    "Describe the first day of school.",
]
"""Prompts for the held-out evaluation; none is in ppo_feedback/prompts.txt (checked at start)."""

DEFAULT_TRAINING = ["--wait-interval", "1"]
"""App and worker options when none are given after `--` (app.py forwards them to the worker): the
app's own defaults, with a shorter wait between the worker's checks. The training defaults live in
`ppo_feedback/config.py`, one set for people and for this benchmark (README, "Training"). Their
`--dtype auto` loads the base in bfloat16 on a CPU with native bfloat16 and in float32 elsewhere, so a
report records the dtype it ran (`base_dtype`); `-- --wait-interval 1 --dtype float32` keeps float32 on
any CPU (options after `--` replace these, so the wait is spelled out again)."""


def held_out_prompts() -> list[str]:
    """Return the held-out prompts, after checking that none is in the pool the app loads."""
    from ppo_feedback.page import builtin_prompts

    pool = set(builtin_prompts())
    overlap = [p for p in HELD_OUT_PROMPTS if p in pool]
    if overlap:
        raise RuntimeError(f"held-out prompts in the pool: {overlap}")
    return list(HELD_OUT_PROMPTS)


def distinct_bigram_share(texts: list[str]) -> float:
    """Return distinct-2 (Li et al. 2016) of `texts`: distinct word bigrams / all word bigrams (lower-cased
    whitespace words; 0.0 when there are none). A policy collapsing onto one phrase drives it down."""
    bigrams = [pair for text in texts for pair in zip(text.lower().split(), text.lower().split()[1:])]
    return len(set(bigrams)) / len(bigrams) if bigrams else 0.0


def evaluate(model: str, adapters_dir: Path, versions: list[int], prompts: list[str], preference, *,
             samples: int, max_new_tokens: int, temperature: float, top_p: float, lora: LoraSettings,
             dtype: str = "auto", seed: int = 1234, batch: int = 16, log=print) -> dict[int, dict[str, Any]]:
    """Sample every version on the held-out prompts, the base's weights in `dtype` as the run's app loaded
    them; return per version its per-prompt tastes, KL and perplexity."""
    from ppo_feedback.adapters import AdapterState, apply_version
    from ppo_feedback.config import ModelConfig
    from ppo_feedback.modeling import add_lora, load_model
    from ppo_feedback.policy import PolicyWithValueHead

    loaded = load_model(ModelConfig(model=model, device="cpu", dtype=dtype))
    policy = PolicyWithValueHead(add_lora(loaded.model, lora), loaded.tokenizer)
    initial = AdapterState.initial(policy)
    results: dict[int, dict[str, Any]] = {}
    for version in versions:
        apply_version(policy, adapters_dir, version, initial=initial)
        results[version] = evaluate_policy(policy, prompts, preference, samples=samples, max_new_tokens=max_new_tokens,
                                           temperature=temperature, top_p=top_p, seed=seed, batch=batch)
        log(f"  held-out v{version}: {len(prompts) * samples} samples in {results[version]['seconds']:.0f}s")
    return results


def evaluate_policy(policy, prompts: list[str], preference, *, samples: int, max_new_tokens: int, temperature: float,
                    top_p: float, seed: int = 1234, batch: int = 16) -> dict[str, Any]:
    """Sample `policy` (its adapter as it is) `samples` times per held-out prompt; return its per-prompt mean
    tastes, per-response KL to the adapter-off reference, base-model perplexity of its text (`base_perplexity`,
    of the sampled tokens; `expected_base_perplexity`, of the tokens the policy would draw at the same contexts,
    `expected_surprisal` at the sampling temperature without top-p: the same quantity without the noise of
    which token each position drew), mean length, distinct-bigram share, a few example texts and the seconds
    taken."""
    from ppo_feedback.direct import expected_surprisal
    from ppo_feedback.generation import sample
    from ppo_feedback.policy import token_logprobs

    start = time.perf_counter()
    tokenizer = policy.tokenizer
    rows = [(i, p) for i, p in enumerate(prompts) for _ in range(samples)]
    tastes: list[list[float]] = [[] for _ in prompts]
    kls, nll, expected_nll, tokens, texts = [], 0.0, 0.0, 0, []
    for k in range(0, len(rows), batch):
        chunk = rows[k:k + batch]
        rollout = sample(policy.peft_model, tokenizer, [p for _, p in chunk], max_new_tokens=max_new_tokens,
                         temperature=temperature, top_p=top_p, seed=seed + k)
        qr, attn, P, mask = rollout.query_response, rollout.attention_mask, rollout.context_length, rollout.response_mask
        base_logits = policy.response_logits(qr, attn, P, reference=True)  # (B, R, V) at temperature 1
        base_logprobs = token_logprobs(base_logits, qr[:, P:])
        ref = base_logprobs if temperature == 1.0 else token_logprobs(base_logits / temperature, qr[:, P:])
        kls += ((rollout.logprobs - ref) * mask).sum(1).tolist()
        nll -= float((base_logprobs * mask).sum())
        expected_nll += float((expected_surprisal(policy.response_logits(qr, attn, P) / temperature, base_logits)
                               * mask).sum())
        tokens += int(mask.sum())
        for (i, _), ids, n in zip(chunk, rollout.responses.tolist(), mask.sum(1).long().tolist()):
            text = tokenizer.decode(ids[:n], skip_special_tokens=True).strip()
            tastes[i].append(float(preference(text)))
            texts.append(text)
    return {"per_prompt": [statistics.fmean(t) for t in tastes], "kl": kls,
            "base_perplexity": math.exp(nll / max(tokens, 1)),
            "expected_base_perplexity": math.exp(expected_nll / max(tokens, 1)),
            "distinct_bigrams": distinct_bigram_share(texts),
            "mean_tokens": tokens / len(rows), "examples": texts[:: max(1, len(texts) // 6)][:6],
            "seconds": time.perf_counter() - start}


def main(argv: list[str] | None = None) -> int:
    given = list(sys.argv[1:] if argv is None else argv)
    argv, passthrough = split_at_dashes(given)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preference", default="keyword:you")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--ratings", type=int, default=200)
    parser.add_argument("--raters", type=int, default=2)
    parser.add_argument("--candidates", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--pace", type=int, default=40, help="ratings per block; the room waits for a version after each")
    parser.add_argument("--pace-timeout", type=float, default=400.0)
    parser.add_argument("--pace-lag", type=int, default=2, help="see python -m simulator --help")
    parser.add_argument("--noise", type=float, default=0.5)
    parser.add_argument("--bias", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--samples", type=int, default=3, help="held-out samples per prompt and version")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads of the app and its worker (OMP_NUM_THREADS); 0 (default): torch's "
                             "default, every core, as `python app.py` runs")
    parser.add_argument("--eval-threads", type=int, default=2,
                        help="torch threads for the held-out evaluation, which runs after the app has stopped")
    parser.add_argument("--budget", type=float, default=900.0, help="seconds the whole run should fit in")
    parser.add_argument("--out", default=None, help="directory for the database, adapters, CSV and PNG")
    parser.add_argument("--repeats", type=int, default=1,
                        help="independent runs, run i with seed --seed + i for the raters and the worker (--seed); "
                             "prints each run's held-out difference and their mean with a 95%% t interval over runs")
    parser.add_argument("--summarize", nargs="+", metavar="RUN_DIR", default=None,
                        help="run nothing: read the report.json of these finished runs (of one taste and one set "
                             "of options, e.g. seeds run apart) and print what --repeats prints of them")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.summarize:
        reports = [json.loads((Path(d) / "report.json").read_text()) for d in args.summarize]
        try:
            sets = {(r["preference"], r.get("threads", 1), base_dtype_of(r, Path(d), settings),
                     json.dumps(settings, sort_keys=True))
                    for r, d, settings in zip(reports, args.summarize, comparable_settings(reports))}
        except ValueError as exc:
            parser.error(str(exc))
        if len(sets) > 1:
            parser.error("--summarize: the runs differ in taste, settings, threads or base dtype; summarize each "
                         "set apart")
        print_summary(summarize_runs(reports))
        return 0

    from simulator.raters import parse_preference

    preference = parse_preference(args.preference)
    prompts = held_out_prompts()
    training = passthrough or DEFAULT_TRAINING
    out = Path(args.out or ROOT / "bench" / "out" / "learning_curve" /
               f"{args.preference.replace(':', '-').replace('/', '_')}-{time.strftime('%Y%m%d-%H%M%S')}")
    runs = [out] if args.repeats == 1 else [out / f"run-{i + 1}" for i in range(args.repeats)]
    if held := [str(d) for d in runs if (d / "feedback.db").exists()]:
        parser.error(f"--out: {', '.join(held)} already holds a run (feedback.db), whose ratings and versions a "
                     "new run there would add to; choose another --out")
    print("command: python bench/learning_curve.py " + shlex.join(given))
    if args.repeats == 1:
        run_once(args, preference, prompts, [*without_seed(training), "--seed", str(args.seed)], out, args.seed)
        return 0
    reports = []
    for i in range(args.repeats):
        seed = args.seed + i
        print(f"\n=== run {i + 1} of {args.repeats}: seed {seed} ===")
        reports.append(run_once(args, preference, prompts, [*without_seed(training), "--seed", str(seed)],
                                runs[i], seed))
    summary = summarize_runs(reports)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print_summary(summary)
    return 0


def without_seed(options: list[str]) -> list[str]:
    """Return app/worker options without their `--seed N` (a run's seed is this benchmark's `--seed`)."""
    kept, skip = [], False
    for option in options:
        if skip:
            skip = False
        elif option == "--seed":
            skip = True
        elif not option.startswith("--seed="):
            kept.append(option)
    return kept


RUN_OWN_SETTINGS = ("seed", "cache_dir")
"""Settings that never tell two runs' settings apart: the run's seed, and the cache path (the user's home)."""


def settings_of(training: list[str], *, given_only: bool = False) -> dict[str, Any]:
    """Return every app and worker setting that the options `training` resolve to, but the seed (and the cache
    path, which is the user's): what makes two runs the same runs, whatever order their options were given in
    and whether a default was spelled out. `given_only`: only the settings the options set (typed, so 1 and 1.0
    alike), the defaults left out."""
    from app import build_parser as app_parser

    parser = app_parser()
    if given_only:
        parser.set_defaults(**dict.fromkeys(vars(parser.parse_args([]))))
    return {k: v for k, v in vars(parser.parse_args(without_seed(training))).items()
            if k not in RUN_OWN_SETTINGS and not (given_only and v is None)}


def comparable_settings(reports: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Return what tells the runs' settings apart: the settings each run recorded when all did, else (a report
    from before runs recorded them, whose defaults were the app's of its day) the options each run set."""
    if all(r.get("settings") for r in reports):
        return [{k: v for k, v in r["settings"].items() if k not in RUN_OWN_SETTINGS} for r in reports]
    settings = []
    for r in reports:
        try:
            settings.append(settings_of(r["training"], given_only=True))
        except SystemExit:  # argparse has printed which option it does not know
            raise ValueError(f"--summarize: the options of run {r.get('out')} are not today's app's; "
                             "summarize it with the commit that made it") from None
    return settings


def base_dtype_of(report: dict[str, Any], run_dir: Path, settings: dict[str, Any]) -> str:
    """Return the dtype the run's base weights were loaded in: its report's `base_dtype`, else (a report from
    before it was recorded) what its app.log says, `--dtype auto` having logged each bfloat16 load on the CPU,
    else the `dtype` of its `settings` (`comparable_settings`: recorded, or the options it set), auto being
    float32 there."""
    if report.get("base_dtype"):
        return report["base_dtype"]
    log = run_dir / "app.log"
    if log.exists() and "base weights in bfloat16" in log.read_text(errors="replace"):
        return "bfloat16"
    return "float32" if settings.get("dtype") in (None, "auto") else settings["dtype"]


def print_summary(summary: dict[str, Any]) -> None:
    """Print several runs' held-out differences, their mean with its interval over runs, and the JSON line."""
    n = summary["repeats"]
    print(f"\n{n} runs, held-out difference newest - v0 per run: "
          + ", ".join(f"{d:+.3f} ± {h:.3f}" for d, h in zip(summary["differences"], summary["differences_ci95"])))
    print(f"mean difference {summary['difference_mean']:+.3f} ± {summary['difference_ci95']} (95% t interval "
          f"over runs); goal met in {sum(summary['goal_met'])} of {n}; KL per run {summary['kl']}; "
          f"perplexity ratio per run {summary['perplexity_ratio']} (expected at the same contexts "
          f"{summary['expected_perplexity_ratio']}); distinct-2 ratio per run "
          f"{summary['distinct_bigram_ratio']}; seconds per run {summary['total_s']}; commits "
          f"{[c[:7] if c else None for c in summary['commits']]}")
    print(json.dumps(summary))


def summarize_runs(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """Return what several runs' reports say together: each run's held-out difference, KL, perplexity and
    goal, and the mean difference with a 95% t interval over runs (a run's own interval is over prompts)."""
    from simulator.report import t_interval

    differences = [r["held_out"]["difference"]["mean"] for r in reports]
    mean, half = t_interval(differences)
    return {"bench": "learning_curve", "repeats": len(reports), "seeds": [r["seed"] for r in reports],
            "differences": differences, "differences_ci95": [r["held_out"]["difference"]["ci95"] for r in reports],
            "difference_mean": round(mean, 4), "difference_ci95": None if math.isnan(half) else round(half, 4),
            "preference": reports[0]["preference"], "training": without_seed(reports[0]["training"]),
            "goal_met": [r["goal_met"] for r in reports], "kl": [r["held_out"]["kl_newest"]["mean"] for r in reports],
            "base_perplexity": [r["held_out"]["base_perplexity"][f"v{r['versions_published'][-1]}"
                                                                  if r["versions_published"] else "v0"]
                                for r in reports],
            "perplexity_ratio": [r["held_out"]["perplexity_ratio"] for r in reports],
            "expected_perplexity_ratio": [r["held_out"].get("expected_perplexity_ratio") for r in reports],
            "distinct_bigram_ratio": [r["held_out"]["distinct_bigram_ratio"] for r in reports],
            "total_s": [r["total_s"] for r in reports], "runs": [r["out"] for r in reports],
            "commits": [r.get("commit") for r in reports]}


def source_commit() -> str | None:
    """Return the git commit of this checkout (with "+changes" when its tracked files differ), None outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=ROOT).returncode != 0
    except (OSError, subprocess.CalledProcessError):
        return None
    return head.stdout.strip() + ("+changes" if dirty else "")


def app_env(threads: int) -> dict[str, str]:
    """Return the app's and worker's environment with `threads` torch threads (0: torch's default, every core)."""
    env = child_env()
    env.pop("OMP_NUM_THREADS", None)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def run_once(args: argparse.Namespace, preference, prompts: list[str], training: list[str], out: Path,
             seed: int) -> dict[str, Any]:
    """Run the app, the worker and the simulated raters once, evaluate v0 and the newest version; return the report."""
    from app import build_parser as app_parser
    from simulator.report import format_summary, t_interval, version_summary, write_csv, write_plot
    from simulator.room import Simulation

    settings = app_parser().parse_args(training)  # the options app.py and its worker run with
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    db, adapters, port = out / "feedback.db", out / "adapters", free_port()
    url = f"http://127.0.0.1:{port}/"
    command = app_command(args.model, port, db, adapters, candidates=args.candidates,
                          max_new_tokens=args.max_new_tokens, extra=training, worker=True, log_level="INFO")
    print("app: " + shlex.join(command[1:]))
    with (out / "app.log").open("w") as app_log:
        app = subprocess.Popen(command, cwd=ROOT, env=app_env(args.threads), stdout=app_log,
                               stderr=subprocess.STDOUT, text=True)
        try:
            startup = wait_for_app(url, app, timeout=400)
            print(f"app and worker up in {startup:.0f}s")
            sim = Simulation(url, preference, raters=args.raters, ratings=args.ratings, candidates=args.candidates,
                             noise=args.noise, bias=args.bias, seed=seed, pace=args.pace, pace_lag=args.pace_lag,
                             pace_timeout=args.pace_timeout, log=lambda m: print(m, flush=True))
            result = sim.run()
        finally:
            stop_process(app, timeout=60)
    rated_s = time.perf_counter() - t0
    rows = version_summary(result.records)
    print("\nThe curve (simulated raters' ratings, per version that generated them):")
    print(format_summary(rows))
    write_csv(result.records, out / "ratings.csv")
    try:
        write_plot(result.records, out / "curve.png", title=f"{args.model}, preference {args.preference}")
    except ImportError:
        print("no curve.png: matplotlib is not installed (pip install matplotlib)")

    from db import FeedbackStore

    with FeedbackStore(db) as store:
        versions = store.list_versions()
        published = [v for v in versions if v.status == "published"]
        metrics = {v.version: v.metrics for v in published}
        failed = {v.version: v.metrics.get("reason") for v in versions if v.status == "failed"}
    newest = published[-1].version if published else 0
    if failed:
        print("versions not published: " + "; ".join(f"v{v}: {why}" for v, why in failed.items()))
    print(f"\nversions published: {[v.version for v in published]}; held-out evaluation of v0 and v{newest} "
          f"({len(prompts)} prompts x {args.samples} samples)")
    import torch

    from ppo_feedback.modeling import resolve_dtype

    torch.set_num_threads(args.eval_threads)
    evals = evaluate(args.model, adapters, sorted({0, newest}), prompts, preference, samples=args.samples,
                     max_new_tokens=args.max_new_tokens, temperature=settings.temperature, top_p=settings.top_p,
                     lora=from_namespace(LoraSettings, settings), dtype=settings.dtype)
    base, new = evals[0], evals[newest]
    m0, h0 = t_interval(base["per_prompt"])
    m1, h1 = t_interval(new["per_prompt"])
    md, hd = t_interval([b - a for a, b in zip(base["per_prompt"], new["per_prompt"])])
    kl_mean, kl_half = t_interval(new["kl"])
    total_s = time.perf_counter() - t0
    print(f"\nheld-out taste  v0: {m0:.3f} ± {h0:.3f}   v{newest}: {m1:.3f} ± {h1:.3f}   "
          f"difference {md:+.3f} ± {hd:.3f} (95% t intervals over {len(prompts)} prompts)")
    print(f"KL(v{newest} || base) per response: {kl_mean:.2f} ± {kl_half:.2f} nats; "
          f"base-model perplexity of v{newest}'s text {new['base_perplexity']:.1f} (of its own: "
          f"{base['base_perplexity']:.1f}); mean length {new['mean_tokens']:.1f} vs {base['mean_tokens']:.1f} tokens")
    perplexity_ratio = new["base_perplexity"] / base["base_perplexity"]
    expected_ratio = new["expected_base_perplexity"] / base["expected_base_perplexity"]
    distinct_ratio = new["distinct_bigrams"] / base["distinct_bigrams"] if base["distinct_bigrams"] else math.nan
    print(f"perplexity ratio {perplexity_ratio:.2f} (goal <= 1.3; expected at the same contexts "
          f"{expected_ratio:.2f}); distinct-bigram share v{newest} "
          f"{new['distinct_bigrams']:.3f} vs v0 {base['distinct_bigrams']:.3f}, ratio {distinct_ratio:.2f} (goal >= 0.8)")
    print(f"examples v{newest}: " + " | ".join(t.replace("\n", " ")[:90] for t in new["examples"][:3]))
    print(f"ratings {len(result.records)} (+{result.preferences} preferences) in {rated_s:.0f}s; total {total_s:.0f}s "
          f"({'within' if total_s <= args.budget else 'OVER'} the {args.budget:.0f}s budget)")

    def r(x: float, d: int = 4) -> float | None:
        return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(x, d)

    report = {
        "bench": "learning_curve", "model": args.model, "preference": args.preference,
        "ratings": len(result.records), "preferences": result.preferences, "raters": args.raters, "seed": seed,
        "training": training, "settings": settings_of(training), "threads": args.threads, "pace": args.pace,
        "base_dtype": str(resolve_dtype(settings.dtype, torch.device("cpu"))).removeprefix("torch."),
        "curve": [{"version": x["version"], "ratings_so_far": x["ratings_so_far"], "n_ratings": x["n_ratings"],
                   "mean_taste": r(x["mean_taste"]), "ci95": r(x["ci95"])} for x in rows],
        "pace_waits": result.pace_waits,
        "versions_published": [v.version for v in published], "versions_failed": failed,
        "train_metrics_newest": {k: r(v) for k, v in metrics.get(newest, {}).items()
                                 if k.startswith(("objective/", "reward_model/"))},
        "held_out": {"prompts": len(prompts), "samples_per_prompt": args.samples,
                     "v0": {"mean": r(m0), "ci95": r(h0)}, f"v{newest}": {"mean": r(m1), "ci95": r(h1)},
                     "difference": {"mean": r(md), "ci95": r(hd)},
                     "kl_newest": {"mean": r(kl_mean, 3), "ci95": r(kl_half, 3)},
                     "base_perplexity": {f"v{newest}": r(new["base_perplexity"], 2), "v0": r(base["base_perplexity"], 2)},
                     "mean_tokens": {f"v{newest}": r(new["mean_tokens"], 1), "v0": r(base["mean_tokens"], 1)},
                     "perplexity_ratio": r(perplexity_ratio, 3),
                     "expected_base_perplexity": {f"v{newest}": r(new["expected_base_perplexity"], 2),
                                                  "v0": r(base["expected_base_perplexity"], 2)},
                     "expected_perplexity_ratio": r(expected_ratio, 3),
                     "distinct_bigrams": {f"v{newest}": r(new["distinct_bigrams"]), "v0": r(base["distinct_bigrams"])},
                     "distinct_bigram_ratio": r(distinct_ratio, 3)},
        "errors": len(result.errors), "rater_failures": result.failures,
        "rating_phase_s": round(rated_s), "total_s": round(total_s), "within_budget": total_s <= args.budget,
        "goal_met": (bool(md - hd > 0) and total_s <= args.budget and len(result.records) <= 200
                     and perplexity_ratio <= 1.3 and distinct_ratio >= 0.8),
        "out": str(out), "commit": source_commit(),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    sys.exit(main())
