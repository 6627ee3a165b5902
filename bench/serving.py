"""Live at human pace: one streamed page of candidates through the running app's API, idle and while a
worker trains, beside Hugging Face `model.generate` on the same batch; prints one JSON line last.

    python bench/serving.py [--model smollm2-135m] [--pages 5] [--candidates 4] [--max-new-tokens 48]
                            [--dtype auto] [--threads N] [--nice 10] [--compare-nice 0]

1. In this process, on the model as the app loads it (base + a fresh LoRA, `--dtype`): a page's decode
   (`ppo_feedback.generation.sample`, all candidates in one batch, no EOS stop, so every run decodes
   candidates x max-new-tokens tokens) against `model.generate` on the same batch with the same
   sampling (temperature 1, no top-k or top-p) and weights: `tokens_per_s`, `hf_generate_page_s`,
   `hf_generate_tokens_per_s` (medians of `--repeats` runs, alternating), and `logprob_gap_nats_per_token`,
   the mean |recorded - fresh forward| behaviour log-probability per token (0 up to rounding in float32);
   the fresh forward is the training policy's (unquantised), so with `--serving-weights int8` the gap and
   `kl_to_trained_nats_per_token` say how far the int8 sampler is from the policy PPO trains.
2. `app.py --no-worker` on a fresh store; `--pages` pages (after one warm-up page) through
   `/generate_stream` with gradio_client: `first_token_s` (request to the first streamed text) and
   `page_s` (request to the recorded page, every token decoded), medians; `page_tokens`: the median
   longest candidate of a page (the decode steps it took; EOS can end a page early).
3. The same while another process runs PPO iterations the whole time (the app's PPO defaults on the
   same model, at the worker's `--nice`): `page_s_training`, and that process's seconds per iteration
   alone and while pages were generated (`iteration_s_alone`, `iteration_s_with_pages`: what pages cost
   a training round). `--compare-nice 0` repeats it with the trainer at that niceness.

Torch runs the app's default threads (all cores) unless `--threads` (OMP_NUM_THREADS for every process).
The goals (#16, 2-core machine): first_token_s <= 0.5, page_s <= 3, page_s_training <= 6, tokens_per_s >=
hf_generate_tokens_per_s.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.load import app_command, child_env, free_port, stop_process, wait_for_app  # noqa: E402

PROMPTS = ["Write a short story about a lighthouse keeper who finds a message in a bottle.",
           "Explain how a bicycle works to a ten-year-old, step by step.",
           "Describe a busy market in the morning, with its sounds and smells.",
           "Write a letter to a friend about your first week at a new job.",
           "Tell me about the history of bread and why people still bake it at home.",
           "Describe the view from the top of a mountain after a long climb."]
GOALS = {"first_token_s": ("<=", 0.5), "page_s": ("<=", 3.0), "page_s_training": ("<=", 6.0),
         "tokens_per_s_vs_hf_generate": (">=", 1.0)}


def load_policy(model: str, dtype: str, weights: str = "same"):
    """Return the app's serving policy for `model`: the base in `dtype` with a fresh LoRA (the app's defaults),
    its linear layers in dynamic int8 when `weights` is int8 (`--serving-weights`)."""
    from ppo_feedback.config import LoraSettings, ModelConfig
    from ppo_feedback.int8 import quantize_base_linears
    from ppo_feedback.modeling import add_lora, load_model
    from ppo_feedback.policy import PolicyWithValueHead

    loaded = load_model(ModelConfig(model=model, device="cpu", dtype=dtype))
    peft_model = add_lora(loaded.model, LoraSettings())
    if weights == "int8":
        quantize_base_linears(peft_model)
    return PolicyWithValueHead(peft_model, loaded.tokenizer)


def in_process(args: argparse.Namespace) -> dict[str, Any]:
    """Time a page's decode against `model.generate` on the same batch, sampling and weights."""
    import torch

    from ppo_feedback.generation import encode_prompts, sample

    policy = load_policy(args.model, args.dtype, args.serving_weights)
    trained = policy if args.serving_weights == "same" else load_policy(args.model, args.dtype)  # the worker's
    model, tokenizer = policy.peft_model, policy.tokenizer
    prompts = [PROMPTS[0]] * args.candidates
    batch = encode_prompts(tokenizer, prompts, args.max_new_tokens, "cpu")

    def ours(seed: int):
        return sample(model, tokenizer, prompts, max_new_tokens=args.max_new_tokens, seed=seed, stop_at_eos=False)

    def theirs(seed: int):
        torch.manual_seed(seed)
        with torch.no_grad():
            return model.generate(**batch, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                  max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens,
                                  pad_token_id=tokenizer.pad_token_id)

    def unquantised(seed: int):
        return sample(trained.peft_model, tokenizer, prompts, max_new_tokens=args.max_new_tokens, seed=seed,
                      stop_at_eos=False)

    runs = [("ours", ours), ("theirs", theirs)] + ([("unquantised", unquantised)] if trained is not policy else [])
    times: dict[str, list[float]] = {name: [] for name, _ in runs}
    for seed in range(args.repeats + 1):  # the first round warms both up and is not counted
        for name, run in runs:
            start = time.perf_counter()
            out = run(seed)
            if seed:
                times[name].append(time.perf_counter() - start)
            if name == "theirs":
                assert out.shape[1] == batch["input_ids"].shape[1] + args.max_new_tokens
    rollout = ours(0)
    with torch.no_grad():  # the training policy's (unquantised) forward, which PPO takes old log-probabilities from
        fresh = trained(rollout.query_response, rollout.attention_mask, rollout.context_length, 1.0)
    mask, tokens = rollout.response_mask, args.candidates * args.max_new_tokens
    gap = ((fresh.logprobs - rollout.logprobs).abs() * mask).sum() / mask.sum()
    kl = ((rollout.logprobs - fresh.logprobs) * mask).sum() / mask.sum()  # sampled tokens: KL(served || trained)
    page_s, hf_page_s = statistics.median(times["ours"]), statistics.median(times["theirs"])
    out = {"dtype": str(next(policy.trunk.parameters()).dtype).removeprefix("torch."),
           "serving_weights": args.serving_weights, "torch_threads": torch.get_num_threads(),
           "decode_page_s": round(page_s, 3), "tokens_per_s": round(tokens / page_s, 2),
           "hf_generate_page_s": round(hf_page_s, 3), "hf_generate_tokens_per_s": round(tokens / hf_page_s, 2),
           "logprob_gap_nats_per_token": round(float(gap), 5), "kl_to_trained_nats_per_token": round(float(kl), 5)}
    if times.get("unquantised"):
        out["unquantised_decode_page_s"] = round(statistics.median(times["unquantised"]), 3)
    return out


def stream_page(client, prompt: str, n: int) -> tuple[float, float, list[int]]:
    """Ask /generate_stream for one page; return (seconds to the first streamed text, seconds to the recorded
    page, its generation ids)."""
    start = time.perf_counter()
    first = None
    job = client.submit(prompt, n, api_name="/generate_stream")
    for _ in job:
        if first is None:
            first = time.perf_counter() - start
    final = job.outputs()[-1]
    page = time.perf_counter() - start
    if first is None or not final or "generation_id" not in final[0]:
        raise RuntimeError(f"/generate_stream gave no streamed text and page: {job.outputs()!r:.500}")
    return first, page, [item["generation_id"] for item in final]


class Trainer:
    """The PPO process the bench owns (`--train-forever` of this script): its seconds per iteration, as they come."""

    def __init__(self, args: argparse.Namespace, nice: int, log_path: Path):
        command = [sys.executable, str(Path(__file__).resolve()), "--train-forever", "--model", args.model,
                   "--dtype", args.dtype, "--max-new-tokens", str(args.max_new_tokens), "--nice", str(nice)]
        self.log = log_path.open("w")
        self.process = subprocess.Popen(command, cwd=ROOT, env=child_env_for(args), stdout=subprocess.PIPE,
                                        stderr=self.log, text=True)
        self.iterations: list[tuple[float, float]] = []  # (end time, seconds)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            if line.startswith("{"):  # anything else a library printed is not ours
                self.iterations.append((time.perf_counter(), json.loads(line)["iteration_s"]))

    def wait_for_iterations(self, count: int, timeout: float = 1800.0) -> None:
        """Wait until `count` iterations have ended; raises if the process died or time ran out."""
        deadline = time.perf_counter() + timeout
        while len(self.iterations) < count:
            if self.process.poll() is not None:
                raise RuntimeError(f"the PPO process exited with code {self.process.returncode}; see {self.log.name}")
            if time.perf_counter() > deadline:
                raise TimeoutError("the PPO process did not finish its iterations in time")
            time.sleep(0.5)

    def stop(self) -> None:
        stop_process(self.process)
        self.log.close()


def child_env_for(args: argparse.Namespace) -> dict[str, str]:
    """Return the environment of the app and trainer processes: torch's default threads unless `--threads`."""
    env = child_env()
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    elif "OMP_NUM_THREADS" not in os.environ:
        env.pop("OMP_NUM_THREADS", None)  # child_env's one thread is for the load bench: serve as the app does
    return env


def serve_pages(client, args: argparse.Namespace, trainer: Trainer | None = None) -> dict[str, Any]:
    """Generate `--pages` pages (with a trainer: until one of its iterations ran wholly among them, at most
    3x as many); return the medians and the trainer's iteration seconds."""
    firsts, pages, ids = [], [], []
    start = time.perf_counter()
    while len(pages) < args.pages or (trainer is not None and len(pages) < 3 * args.pages
                                      and not [s for end, s in trainer.iterations if end - s >= start]):
        first, page, generation_ids = stream_page(client, PROMPTS[len(pages) % len(PROMPTS)], args.candidates)
        firsts.append(first)
        pages.append(page)
        ids.append(generation_ids)
    out = {"first_token_s": round(statistics.median(firsts), 3), "page_s": round(statistics.median(pages), 3),
           "pages": len(pages), "ids": ids}
    if trainer is not None:
        during = [s for end, s in trainer.iterations if end - s >= start]
        out["iteration_s_with_pages"] = round(statistics.median(during), 2) if during else None
    return out


def page_tokens(db: Path, pages: list[list[int]]) -> float:
    """Return the median over pages of their longest candidate's tokens (the decode steps a page took)."""
    from db import FeedbackStore

    with FeedbackStore(db) as store:
        return statistics.median(max(len(store.get_generation(g).token_ids) for g in page) for page in pages)


def through_the_app(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Serve pages from app.py idle and while a PPO process trains at each niceness; return the figures."""
    from gradio_client import Client

    port, db = free_port(), work / "feedback.db"
    command = app_command(args.model, port, db, work / "adapters", candidates=args.candidates,
                          max_new_tokens=args.max_new_tokens,
                          extra=["--dtype", args.dtype, "--serving-weights", args.serving_weights])
    app = subprocess.Popen(command, cwd=ROOT, env=child_env_for(args), stdout=subprocess.DEVNULL,
                           stderr=(work / "app.log").open("w"))
    out: dict[str, Any] = {}
    try:
        url = f"http://127.0.0.1:{port}/"
        wait_for_app(url, app, timeout=600)
        client = Client(url, verbose=False)
        stream_page(client, PROMPTS[-1], args.candidates)  # warm-up
        idle = serve_pages(client, args)
        out.update(first_token_s=idle["first_token_s"], page_s=idle["page_s"], pages=idle["pages"],
                   page_tokens=page_tokens(db, idle["ids"]))
        for nice in [args.nice, *args.compare_nice]:
            trainer = Trainer(args, nice, work / f"trainer-nice{nice}.log")
            try:
                trainer.wait_for_iterations(1 + args.alone_iterations)  # the first one warms up
                alone = statistics.median(s for _, s in trainer.iterations[1:])
                busy = serve_pages(client, args, trainer)
            finally:
                trainer.stop()
            out.setdefault("training", []).append(
                {"nice": nice, "page_s": busy["page_s"], "first_token_s": busy["first_token_s"],
                 "pages": busy["pages"], "page_tokens": page_tokens(db, busy["ids"]),
                 "iteration_s_alone": round(alone, 2), "iteration_s_with_pages": busy["iteration_s_with_pages"]})
        out["page_s_training"] = out["training"][0]["page_s"]
    finally:
        stop_process(app)
    return out


def train_forever(args: argparse.Namespace) -> None:
    """The trainer process: the app's PPO defaults on `--model`, one JSON line {"iteration_s"} per iteration."""
    import torch

    from bench.ppo_iteration import LinearRewardHead
    from ppo_feedback.config import PPOConfig, RolloutSampling, SamplingConfig
    from ppo_feedback.trainer import PPOTrainer
    from ppo_feedback.worker import lower_priority

    lower_priority(args.nice)
    torch.manual_seed(0)
    policy = load_policy(args.model, args.dtype)
    config = PPOConfig(sampling=RolloutSampling.from_page(SamplingConfig(max_new_tokens=args.max_new_tokens)))
    trainer = PPOTrainer(policy, config)
    reward = LinearRewardHead(trainer.features.size)
    prompts = (PROMPTS * config.batch_size)[:config.batch_size]
    while True:
        start = time.perf_counter()
        trainer.step(prompts, reward)
        print(json.dumps({"iteration_s": round(time.perf_counter() - start, 3)}), flush=True)


def goals(result: dict[str, Any]) -> dict[str, Any]:
    """Return each goal of #16 with the measured value and whether it is met."""
    values = {**result, "tokens_per_s_vs_hf_generate": round(result["tokens_per_s"] / result["hf_generate_tokens_per_s"], 3)}
    return {name: {"goal": f"{op} {bound}", "value": values[name],
                   "met": values[name] <= bound if op == "<=" else values[name] >= bound}
            for name, (op, bound) in GOALS.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="auto", help="the app's --dtype (auto: as the app picks it)")
    parser.add_argument("--serving-weights", default="same", choices=["same", "int8"],
                        help="the app's --serving-weights; with int8 the anchor generates on the same int8 model and "
                             "unquantised_decode_page_s times the float decode beside it")
    parser.add_argument("--pages", type=int, default=5, help="pages per median (at least 5 for the goals)")
    parser.add_argument("--candidates", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=5, help="in-process decodes per median")
    parser.add_argument("--threads", type=int, default=None, help="torch threads of every process (default: all)")
    parser.add_argument("--nice", type=int, default=None, help="the PPO process's niceness (default: the worker's)")
    parser.add_argument("--compare-nice", type=int, nargs="*", default=[], help="also train at these")
    parser.add_argument("--alone-iterations", type=int, default=1, help="PPO iterations timed before pages")
    parser.add_argument("--train-forever", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.nice is None:
        from ppo_feedback.config import WorkerConfig

        args.nice = WorkerConfig().worker_nice
    if args.train_forever:
        train_forever(args)
        return 0
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    result = {"bench": "serving", "model": args.model, "candidates": args.candidates,
              "max_new_tokens": args.max_new_tokens, "trainer_nice": args.nice, **in_process(args)}
    print(json.dumps(result), flush=True)
    (ROOT / "bench" / "out").mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="serving-", dir=ROOT / "bench" / "out"))
    try:
        result.update(through_the_app(args, work))
    except BaseException:
        print(f"the app's and the trainer's logs are in {work}", file=sys.stderr)
        raise
    shutil.rmtree(work, ignore_errors=True)
    result["goals"] = goals(result)
    result["load_avg_1m"] = round(os.getloadavg()[0], 2)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
