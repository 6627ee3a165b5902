"""Helpers shared by the page's tests (test_ui_api, test_browser): launch the page in-process, publish versions.

No tests here; the page runs in this process with `prevent_thread_lock`, on a free loopback port.
"""
from __future__ import annotations

import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import httpx
import torch

from db import Cursor, FeedbackStore, NewGeneration
from ppo_feedback.adapters import AdapterStore
from ppo_feedback.auth import User, UserDirectory, hash_password, write_users_file
from ppo_feedback.config import AppConfig, LoraSettings, ModelConfig, SamplingConfig
from ppo_feedback.generation import Candidate
from ppo_feedback.page import FeedbackApp, build_demo, launch_options
from ppo_feedback.serving import PageProgress
from store_fixtures import migrated_sqlite_template

LORA = LoraSettings(lora_r=4, lora_alpha=8)
SAMPLING = SamplingConfig(num_candidates=3, max_candidates=4, max_new_tokens=8, max_prompt_chars=200)
PASSWORDS = {"ana": "ana-secret", "ben": "ben-secret"}  # ana is an admin, ben is not


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def page_store(path: Path, prompts: list[str] = ()) -> FeedbackStore:
    """Return a new SQLite store at `path` (the migrated template copied), with the page's prompt limit and `prompts`."""
    shutil.copyfile(migrated_sqlite_template(), path)
    store = FeedbackStore(path, max_prompt_chars=SAMPLING.max_prompt_chars)
    store.add_prompts(list(prompts))
    return store


def write_users(path: Path) -> UserDirectory:
    """Write a users file with ana (admin) and ben (rater), cheaply hashed; return the app's view of it."""
    write_users_file(path, {name: User(name, hash_password(pw, 1000), admin=(name == "ana"))
                            for name, pw in PASSWORDS.items()})
    return UserDirectory(path)


def load_serving(model_dir, store: FeedbackStore, adapters: Path, sampling: SamplingConfig = SAMPLING):
    """Return a ServingModel on the tiny model, already serving the store's version."""
    from ppo_feedback.serving import ServingModel

    return ServingModel.load(ModelConfig(model=str(model_dir), device="cpu"), LORA, store, adapters,
                             sampling=sampling)


@dataclass
class Launched:
    url: str
    app: FeedbackApp
    demo: object

    def close(self) -> None:
        self.demo.close()
        self.app.close()


def patient_url_ok(url: str, patience_s: float = 60.0) -> bool:
    """Gradio's check that the page answers on localhost before `launch` returns, with patience: True as soon
    as a HEAD of `url` gets any answer (a login page's 401 included), False after `patience_s` seconds of
    timeouts or refusals. Gradio's own (`networking.url_ok`) gives up at the first 3 s timeout and `launch`
    then raises, which made page tests fail on a saturated machine for a reason no test is about."""
    deadline = time.monotonic() + patience_s
    while True:
        try:
            httpx.head(url, timeout=10, verify=False)
            return True
        except httpx.TransportError:  # timeouts included
            pass
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)


def launch(serving, store: FeedbackStore, sampling: SamplingConfig = SAMPLING, *, users: UserDirectory | None = None,
           worker_note: str | None = None, config: AppConfig | None = None, clock=time.monotonic,
           **options) -> Launched:
    """Build the page around `serving` (FeedbackApp `options` such as shuffle_seed, overlap) and serve it on a
    free port without blocking, with `launch_options(app, config, clock=clock)`; return where."""
    app = FeedbackApp(serving, store, sampling, users=users, worker_note=worker_note, **options)
    demo = build_demo(app)
    port = free_port()
    with mock.patch("gradio.networking.url_ok", patient_url_ok):
        demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                    **launch_options(app, config, clock=clock))
    return Launched(f"http://127.0.0.1:{port}/", app, demo)


@torch.no_grad()
def publish_version(model_dir, store: FeedbackStore, adapters: Path, seed: int, *, metrics_points: int = 3) -> int:
    """Publish an adapter version with random LoRA weights (as the worker would) and a few PPO metrics; return it."""
    from db import VersionRecord
    from ppo_feedback.adapters import VersionLifecycle
    from ppo_feedback.modeling import add_lora, load_model
    from ppo_feedback.policy import PolicyWithValueHead

    loaded = load_model(ModelConfig(model=str(model_dir), device="cpu"))
    torch.manual_seed(0)
    policy = PolicyWithValueHead(add_lora(loaded.model, LORA), loaded.tokenizer)
    generator = torch.Generator().manual_seed(seed)
    for name, p in policy.named_parameters():
        if "lora_B" in name or name.startswith("value_head."):
            p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
    version = store.next_version_number()
    for iteration in range(metrics_points):
        store.record_metrics(version, iteration, {"objective/scores": 0.1 * seed + 0.05 * iteration,
                                                  "objective/kl": 0.2 * iteration, "loss/policy": 0.0})
    record = VersionRecord(parent=store.serving_version(), base_model=loaded.spec, cursor=Cursor(), n_ratings=0,
                           n_preferences=0, metrics={"objective/kl": 0.1})
    return VersionLifecycle(store, AdapterStore(adapters)).publish(policy, record)


class ScriptedServing:
    """A stand-in for ServingModel that 'generates' fixed texts, streamed a few characters a step (`step_s`
    seconds apart), recording them as usual."""

    def __init__(self, store: FeedbackStore, texts: list[str], adapters: Path, step_s: float = 0.0, chars: int = 8):
        self.store = store
        self.texts = texts
        self.adapters = AdapterStore(adapters)
        self.version = 0
        self.last_swap_error = None
        self.base_model = "scripted <b>model</b>"
        self.step_s = step_s
        self.chars = chars
        self._calls = 0

    def generate_stream(self, prompt, n=None, *, rater, prompt_id=None, seed=None, page_id=None, admit_prompt=False,
                        **_):
        texts = [self.texts[(self._calls + i) % len(self.texts)] for i in range(n or 1)]
        self._calls += len(texts)  # keep cycling through the texts
        for end in range(self.chars, max(map(len, texts)), self.chars):
            time.sleep(self.step_s)
            yield PageProgress([t[:end] for t in texts], self.version)
        if prompt_id is None:
            prompt_id = self.store.add_prompt(prompt, source="rater", added_by=rater, admitted=admit_prompt)
        generations = self.store.record_generations(prompt_id, self.version, [NewGeneration(t) for t in texts],
                                                    rater=rater, page_id=page_id)
        yield PageProgress(texts, self.version, generations)

    def generate(self, prompt, n=None, **kwargs):
        *_, last = self.generate_stream(prompt, n, **kwargs)
        return last.generations

    def generate_with_version(self, prompt, version, seed=None, *, n=1, **_):
        return [Candidate(text=self.texts[i % len(self.texts)], token_ids=[], logprobs=[],
                          finished=True) for i in range(n)]

    def rollback(self, version):
        return self.store.rollback_to(version)
