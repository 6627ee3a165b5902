"""The worker as a real process: ratings in → version published → serving swaps; crashes lose nothing."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from db import FeedbackStore, NewGeneration
from ppo_feedback.config import LoraSettings, ModelConfig, ObjectiveConfig, RolloutSampling, SamplingConfig
from ppo_feedback.generation import generate
from ppo_feedback.serving import ServingModel

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["The weather today is", "I love this pizza", "Once upon a time", "Machine learning models"]

pytestmark = pytest.mark.slow  # real subprocesses, each loading torch: tens of seconds


@pytest.fixture
def rated_store(tmp_path, tiny_loaded):
    """A SQLite store with 4 prompts, 8 tiny-model generations and 8 ratings by two raters."""
    store = FeedbackStore(tmp_path / "feedback.db")
    ids = store.add_prompts(PROMPTS)
    for pid, text in zip(ids, PROMPTS):
        candidates = generate(tiny_loaded.model, tiny_loaded.tokenizer, text, n=2, max_new_tokens=8, seed=pid)
        gens = store.record_generations(pid, 0, [NewGeneration(c.text, c.token_ids, c.logprobs, {"seed": pid})
                                                 for c in candidates])
        store.rate(gens[0].id, "ann", 5)
        store.rate(gens[1].id, "bob", 2)
    yield store
    store.close()


def worker_cmd(tmp_path, model_dir, *extra: str) -> list[str]:
    """A worker process on the tiny model whose PPO rounds optimise their reward model even when it is not
    trusted (a few ratings of a tiny model's text), so the PPO path runs (`test_reward_gate.py` tests the gate)."""
    return [sys.executable, "-m", "ppo_feedback.worker", "--db", str(tmp_path / "feedback.db"),
            "--adapters-dir", str(tmp_path / "adapters"), "--model", str(model_dir), "--device", "cpu",
            "--max-new-tokens", "8", "--batch-size", "4", "--mini-batch-size", "4", "--ppo-epochs", "1",
            "--ppo-iterations", "2", "--reference-samples", "4", "--wait-interval", "0.2",
            "--min-ratings", "8", "--objective", "ppo", "--reward-model-fallback", "ppo", *extra]


def start(cmd: list[str], log_path: Path) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=open(log_path, "w"), stderr=subprocess.STDOUT)


def wait_for(condition, timeout: float, proc: subprocess.Popen | None = None, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"worker exited with {proc.returncode} while waiting for {what}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_worker_publishes_and_serving_swaps_to_it(tmp_path, tiny_model_dir, rated_store):
    serving = ServingModel.load(ModelConfig(model=str(tiny_model_dir), device="cpu"), LoraSettings(), rated_store,
                                tmp_path / "adapters", sampling=SamplingConfig(max_new_tokens=8))
    assert serving.version == 0
    proc = start(worker_cmd(tmp_path, tiny_model_dir, "--min-new-feedback", "8"), tmp_path / "worker.log")
    try:
        wait_for(lambda: rated_store.serving_version() >= 1, 240, proc, "version 1")
        v1 = rated_store.get_version(1)
        assert v1.status == "published" and v1.parent == 0 and v1.n_ratings == 8
        assert (tmp_path / "adapters" / "v0001" / "adapter_model.safetensors").is_file()
        assert "objective/kl" in v1.metrics and "reward_model/n_examples" in v1.metrics
        points = rated_store.metrics(1)
        assert {p.iteration for p in points} == {1, 2}
        assert serving.poll_once() == 1
        records = serving.generate(PROMPTS[0], 2, rater="carol")
        assert [r.adapter_version for r in records] == [1, 1]
        # with no new feedback it waits, and says so
        wait_for(lambda: "waiting for" in rated_store.worker_status().state, 60, proc, "waiting state")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        assert not rated_store.worker_status().present
    finally:
        proc.kill()


def test_sigkill_mid_round_then_restart_completes_without_loss(tmp_path, tiny_model_dir, rated_store):
    cmd = worker_cmd(tmp_path, tiny_model_dir, "--min-new-feedback", "8", "--lease-ttl", "3",
                     "--ppo-iterations", "6")
    # the first worker's round is long enough to be caught in it however fast the machine (6 iterations of the
    # tiny model can pass between two looks at its state); it is killed there, so its length costs nothing
    proc = start([*cmd, "--ppo-iterations", "1000"], tmp_path / "worker1.log")
    try:
        wait_for(lambda: "training iteration" in rated_store.worker_status().state, 240, proc, "training")
        first_holder = rated_store.worker_status().holder
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert rated_store.serving_version() == 0  # nothing half-published
    assert not list((tmp_path / "adapters").glob("v[0-9]*"))
    ratings_before = rated_store.counts()["ratings"]
    restarted = start(cmd, tmp_path / "worker2.log")
    try:
        wait_for(lambda: rated_store.serving_version() >= 1, 240, restarted, "version 1 after restart")
        v1 = rated_store.get_version(1)
        assert v1.n_ratings == ratings_before == 8  # no rating lost or counted twice
        assert rated_store.worker_status().holder not in (None, first_holder)  # taken over after expiry
        assert not [p for p in (tmp_path / "adapters").iterdir() if p.name.startswith(".tmp-")]
    finally:
        restarted.send_signal(signal.SIGTERM)
        restarted.wait(timeout=60)


def test_two_workers_only_one_trains(tmp_path, tiny_model_dir, rated_store):
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    procs = [start(worker_cmd(tmp_path, tiny_model_dir, "--min-new-feedback", "8", "--worker-id", name), log)
             for name, log in zip(("worker-a", "worker-b"), logs)]
    try:
        wait_for(lambda: rated_store.serving_version() >= 1, 240, None, "version 1")
        time.sleep(2)
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(timeout=60)
    trained = [log.read_text().count("iteration 1/2") for log in logs]
    assert sorted(trained) == [0, 1], trained
    assert [v.version for v in rated_store.list_versions()] == [1]


# ------------------------------------------------------------------------------ in-process rounds

def make_worker(tmp_path, tiny_model_dir, store, objective=None, ppo_epochs=1, **worker_overrides):
    """A worker on the tiny model training PPO (named, whatever the default objective is); PPO rounds optimise
    their reward model even when it is not trusted (a few ratings of a tiny model's text), so the PPO path
    runs (`test_reward_gate.py` tests the gate); no fluency gate unless `worker_overrides` sets one
    (`test_fluency.py` tests it)."""
    from ppo_feedback.adapters import AdapterStore
    from ppo_feedback.modeling import add_lora, load_model
    from ppo_feedback.policy import PolicyWithValueHead
    from ppo_feedback.trainer import PPOConfig
    from ppo_feedback.worker import Heartbeat, Worker, WorkerConfig

    loaded = load_model(ModelConfig(model=str(tiny_model_dir), device="cpu"))
    policy = PolicyWithValueHead(add_lora(loaded.model, LoraSettings()), loaded.tokenizer)
    config = WorkerConfig(**{"min_new_feedback": 4, "min_ratings": 8, "ppo_iterations": 2, "reference_samples": 4,
                             "wait_interval": 0.1, "max_perplexity_ratio": None,
                             **worker_overrides})
    worker = Worker(store, AdapterStore(tmp_path / "adapters"), policy,
                    PPOConfig(batch_size=4, mini_batch_size=4, ppo_epochs=ppo_epochs,
                              sampling=RolloutSampling(max_new_tokens=8)), config, "tiny",
                    objective=objective or ObjectiveConfig(objective="ppo", reward_model_fallback="ppo"))
    worker.lease_token = store.acquire_lease(worker.holder, 30)
    assert worker.lease_token
    worker.heartbeat = Heartbeat(store, worker.holder, 30, worker.lease_token)
    return worker


def lora_weights(worker):
    return [p.detach().clone() for p in worker.policy.trainable_parameters()]


def test_diverging_round_is_discarded_and_recorded(tmp_path, tiny_model_dir, rated_store):
    worker = make_worker(tmp_path, tiny_model_dir, rated_store, max_kl=50.0)
    before = lora_weights(worker)
    real_step = worker.trainer.step
    worker.trainer.step = lambda *a, **k: {**real_step(*a, **k), "objective/kl": 1e6}  # KL explodes
    assert worker.run_round() is None
    failed = rated_store.get_version(1)
    assert failed.status == "failed" and "KL" in str(failed.metrics)
    assert rated_store.serving_version() == 0
    assert all(torch.equal(a, b) for a, b in zip(before, lora_weights(worker)))


def test_nan_loss_round_is_discarded(tmp_path, tiny_model_dir, rated_store, monkeypatch):
    from ppo_feedback import worker as worker_module

    worker = make_worker(tmp_path, tiny_model_dir, rated_store)
    real_fit = worker_module.fit_reward_model

    def nan_reward(*args, **kwargs):
        model, report = real_fit(*args, **kwargs)
        model.score_hidden = lambda hidden: torch.full((hidden.shape[0],), float("nan"))
        return model, report

    monkeypatch.setattr(worker_module, "fit_reward_model", nan_reward)
    assert worker.run_round() is None
    assert rated_store.get_version(1).status == "failed"
    assert "non-finite" in str(rated_store.get_version(1).metrics)


def test_stop_mid_round_publishes_nothing(tmp_path, tiny_model_dir, rated_store):
    worker = make_worker(tmp_path, tiny_model_dir, rated_store)
    before = lora_weights(worker)
    step = worker.trainer.step

    def step_then_stop(*args, **kwargs):
        stats = step(*args, **kwargs)
        worker.stop_requested.set()  # SIGTERM arrives during the first iteration
        return stats

    worker.trainer.step = step_then_stop
    assert worker.run_round() is None
    assert rated_store.list_versions() == []
    assert not list((tmp_path / "adapters").glob("v[0-9]*"))
    assert all(torch.equal(a, b) for a, b in zip(before, lora_weights(worker)))


def test_waits_for_enough_new_feedback(tmp_path, tiny_model_dir, rated_store):
    worker = make_worker(tmp_path, tiny_model_dir, rated_store, min_new_feedback=12)
    assert worker.run_round() is None
    assert rated_store.worker_status().state == "waiting for 4 more ratings"


def test_round_publishes_with_metrics_in_store_and_tensorboard(tmp_path, tiny_model_dir, rated_store, caplog):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from ppo_feedback.rewards import RewardConfig

    worker = make_worker(tmp_path, tiny_model_dir, rated_store, tensorboard=str(tmp_path / "tb"))
    worker.reward_config = RewardConfig(reward_l2=2.0)  # what --reward-l2 2 gives
    with caplog.at_level("INFO", logger="ppo_feedback.worker"):
        assert worker.run_round() == 1
    assert rated_store.get_version(1).metrics["reward_model/l2"] == 2.0
    assert any("l2 2 (set)" in r.getMessage() for r in caplog.records)
    assert [p.iteration for p in rated_store.metrics(1) if p.name == "objective/kl"] == [1, 2]
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert {"objective/kl", "objective/scores", "loss/policy"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("objective/kl")] == [1, 2]
    lines = [r.getMessage() for r in caplog.records if "iteration" in r.getMessage()]
    assert len(lines) == 2 and "kl" in lines[0] and "score" in lines[0]


def test_data_parallel_under_accelerate_keeps_processes_identical(tmp_path, tiny_model_dir, rated_store):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(port), "-m"]
    cmd = launch + worker_cmd(tmp_path, tiny_model_dir, "--min-new-feedback", "8")[2:]
    log_path = tmp_path / "ddp.log"
    proc = start(cmd, log_path)
    try:
        wait_for(lambda: rated_store.serving_version() >= 1, 300, proc, "version 1 from two processes")
        wait_for(lambda: "waiting for" in rated_store.worker_status().state, 60, proc, "waiting state")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    text = log_path.read_text()
    assert text.count("data-parallel process") == 2
    checksums = [line.rsplit(" ", 1)[1] for line in text.splitlines() if "trainable weights sha256" in line]
    assert len(checksums) == 2 and checksums[0] == checksums[1], text[-3000:]
    assert [v.version for v in rated_store.list_versions()] == [1]
    assert sorted(p.iteration for p in rated_store.metrics(1) if p.name == "objective/kl") == [1, 2]


def test_rated_generations_sampled_at_the_training_temperature_are_replayed(tmp_path, tiny_model_dir, tiny_loaded):
    from ppo_feedback.feedback import read_feedback

    store = FeedbackStore(tmp_path / "feedback.db")
    ids = store.add_prompts(PROMPTS)
    replayable, other = [], []
    for pid, text in zip(ids, PROMPTS):
        temperature = 0.7 if text == PROMPTS[3] else 1.0  # the page's sampling settings, recorded
        candidates = generate(tiny_loaded.model, tiny_loaded.tokenizer, text, n=3, max_new_tokens=8, seed=pid,
                              temperature=temperature)
        gens = store.record_generations(pid, 0, [NewGeneration(c.text, c.token_ids, c.logprobs,
                                                               {"temperature": temperature, "seed": pid})
                                                 for c in candidates])
        store.rate(gens[0].id, "ann", 5)
        store.rate(gens[1].id, "bob", 2)
        store.prefer(gens[0].id, gens[2].id, "ann")  # gens[2] only in a preference: no score to replay
        (other if temperature != 1.0 else replayable).extend(gens[:2])
        other.append(gens[2])
    worker = make_worker(tmp_path, tiny_model_dir, store, replay_samples=3)
    feedback = read_feedback(store)
    pool = worker.replay_pool(feedback)
    by_id = {g.id: float(z) for g, z in zip(feedback.generations, feedback.relative_scores())}
    # rated above its sibling: ann's 5 against bob's 2, on each of the 3 prompts sampled at temperature 1
    above = [g for g in replayable if by_id[g.id] > 0]
    assert len(above) == 3 and {g.id for g in above} < {g.id for g in replayable}
    assert {tuple(r): s for r, s in zip(pool.responses, pool.scores)} == {tuple(g.token_ids): by_id[g.id]
                                                                         for g in above}
    assert worker.run_round() == 1
    replayed = [p.value for p in store.metrics(1) if p.name == "replay/samples"]
    assert replayed == [3.0, 3.0]  # each of the 2 iterations replayed all 3
    store.close()
