"""The team set-up: two page processes share one PostgreSQL database and one adapter directory."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from db import Cursor, FeedbackStore, VersionRecord
from store_fixtures import PG_URL_ENV, fresh_postgres_url
from ppo_feedback.adapters import AdapterStore, VersionLifecycle
from ppo_feedback.config import LoraSettings, ModelConfig
from ppo_feedback.modeling import add_lora, load_model
from ppo_feedback.policy import PolicyWithValueHead

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.postgres, pytest.mark.slow]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(url: str, port: int, model_dir, adapters: Path, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "app.py", "--model", str(model_dir), "--port", str(port), "--db", url,
           "--adapters-dir", str(adapters), "--no-worker", "--max-new-tokens", "6", "--poll-interval", "0.5"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False")
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if condition():
                return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def test_two_pages_one_postgres_share_ratings_and_versions(tmp_path, tiny_model_dir):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    base_url = os.environ.get(PG_URL_ENV)
    if not base_url:
        pytest.skip(f'{PG_URL_ENV} is not set; start PostgreSQL with: eval "$(bash .ci/start_postgres.sh)"')
    adapters = tmp_path / "adapters"
    with fresh_postgres_url(base_url) as url:
        FeedbackStore(url).close()  # migrate once before two processes start
        ports = [free_port(), free_port()]
        procs = [start_app(url, port, tiny_model_dir, adapters, tmp_path / f"app{i}.log")
                 for i, port in enumerate(ports)]
        try:
            for port in ports:
                wait_until(lambda: socket.create_connection(("127.0.0.1", port), timeout=1).close() is None,
                           180, f"app on {port}")
            a, b = (Client(f"http://127.0.0.1:{port}/", verbose=False) for port in ports)
            [generation] = a.predict("Shared prompt", 1, "ann", api_name="/generate")
            a.predict(generation["generation_id"], 4, "", "ann", api_name="/rate")
            assert b.predict(api_name="/status")["counts"]["ratings"] == 1
            with pytest.raises(AppError, match="not shown to 'bob'"):  # one page's rule holds on every page
                b.predict(generation["generation_id"], 2, "", "bob", api_name="/rate")
            [own] = b.predict("Shared prompt", 1, "bob", api_name="/generate")
            b.predict(own["generation_id"], 2, "", "bob", api_name="/rate")
            assert a.predict(api_name="/status")["counts"]["ratings"] == 2

            # a trainer elsewhere publishes version 1 into the shared directory and database
            loaded = load_model(ModelConfig(model=str(tiny_model_dir), device="cpu"))
            policy = PolicyWithValueHead(add_lora(loaded.model, LoraSettings()), loaded.tokenizer)
            with torch.no_grad():
                for name, p in policy.peft_model.named_parameters():
                    if "lora_B" in name:
                        p.normal_(0, 0.5)
            store = FeedbackStore(url)
            record = VersionRecord(parent=0, base_model=str(tiny_model_dir), cursor=Cursor(), n_ratings=2,
                                   n_preferences=0)
            assert VersionLifecycle(store, AdapterStore(adapters)).publish(policy, record) == 1
            store.close()
            for client in (a, b):
                wait_until(lambda: client.predict(api_name="/status")["serving_version"] == 1, 60, "swap to v1")
                [fresh] = client.predict("Shared prompt", 1, "carol", api_name="/generate")
                assert fresh["version"] == 1
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                proc.wait(timeout=60)
