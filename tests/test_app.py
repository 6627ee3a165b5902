"""app.py: every option documented with its env variable, bad specs exit cleanly, the page serves."""
from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import app
from ppo_feedback.config import field_docs

ROOT = Path(__file__).resolve().parents[1]


def test_help_lists_every_field_with_default_and_env():
    text = app.build_parser().format_help()
    for cls, _title in app.SECTIONS:
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            assert "--" + f.name.replace("_", "-") in text
            assert f"PPO_FEEDBACK_{f.name.upper()}" in text
            assert docs.get(f.name), f"{cls.__name__}.{f.name} has no docstring"


def test_help_is_quick_because_the_options_do_not_import_torch():
    code = "import sys, app; app.build_parser().format_help(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_environment_variables_set_defaults_and_flags_override(monkeypatch):
    monkeypatch.setenv("PPO_FEEDBACK_PORT", "9999")
    monkeypatch.setenv("PPO_FEEDBACK_MODEL", "smollm2-135m")
    args = app.build_parser().parse_args([])
    assert args.port == 9999 and args.model == "smollm2-135m"
    assert app.build_parser().parse_args(["--port", "1234"]).port == 1234


def test_bad_model_spec_exits_with_one_clear_line(tmp_path):
    result = subprocess.run([sys.executable, "app.py", "--model", str(tmp_path / "missing")], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "no such model directory" in result.stderr and "Traceback" not in result.stderr


def test_bad_option_value_exits_cleanly():
    assert app.main(["--top-p", "1.5"]) == 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_binding_to_the_network_without_logins_is_refused(capsys):
    assert app.main(["--host", "0.0.0.0"]) == 2
    assert "--insecure-no-auth" in capsys.readouterr().err


def test_a_users_file_with_clear_text_passwords_is_refused(tmp_path, capsys):
    users = tmp_path / "users.json"
    users.write_text('{"users": {"ana": {"password": "hunter2"}}}')
    assert app.main(["--auth-file", str(users), "--db", str(tmp_path / "f.db")]) == 2
    assert "not a pbkdf2_sha256 hash" in capsys.readouterr().err


def test_the_worker_child_is_stopped_with_the_app(monkeypatch):
    monkeypatch.setattr(app, "WORKER_MODULE", "http.server")  # any long-running module stands in
    proc, note = app.start_worker(["--bind", "127.0.0.1", "0"])
    assert note is None and proc.poll() is None
    app.stop_worker(proc, timeout=10)
    assert proc.poll() is not None


def test_the_worker_child_finds_the_package_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # `python /path/to/app.py` started elsewhere: the child imports ppo_feedback all the same
    monkeypatch.setattr(app, "WORKER_MODULE", "ppo_feedback.__main__")
    proc, _ = app.start_worker(["--help"])
    assert proc.wait(timeout=60) == 0


def test_app_serves_the_page_and_its_api(tiny_model_dir, tmp_path):
    from gradio_client import Client

    from ppo_feedback.page import builtin_prompts

    port = free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False")
    proc = subprocess.Popen([sys.executable, "app.py", "--model", str(tiny_model_dir), "--port", str(port),
                             "--db", str(tmp_path / "f.db"), "--adapters-dir", str(tmp_path / "adapters"),
                             "--max-new-tokens", "8", "--no-worker"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None, proc.stdout.read()
                assert time.monotonic() < deadline, "app did not start"
                time.sleep(0.5)
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        pool = client.predict(api_name="/next_prompt")
        assert pool["text"] == builtin_prompts()[0]  # the built-in prompts were seeded
        result = client.predict("The weather today is", 3, api_name="/generate")
        assert len(result) == 3 and all(isinstance(c["text"], str) and c["version"] == 0 for c in result)
        assert client.predict(result[0]["generation_id"], 4, api_name="/rate") == {"ok": True}
        status = client.predict(api_name="/status")
        assert status["counts"]["ratings"] == 1 and status["serving_version"] == 0
        assert status["worker"]["state"] == "paused: no worker started here (--no-worker)"
        with pytest.raises(Exception, match="empty"):
            client.predict("   ", 2, api_name="/generate")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert proc.returncode == 0, proc.stdout.read()  # SIGTERM shuts down cleanly


def test_app_accepts_and_lists_the_worker_options():
    """app.py passes the worker's options on to the worker it starts, so it must accept them all."""
    import argparse

    worker = pytest.importorskip("ppo_feedback.worker")
    own = argparse.ArgumentParser(add_help=False)
    worker.add_worker_arguments(own)
    worker_options = {o for action in own._actions for o in action.option_strings}
    parser = app.build_parser()
    app_options = {o for action in parser._actions for o in action.option_strings}
    assert worker_options and worker_options <= app_options
    help_text = parser.format_help()
    assert all(o in help_text for o in worker_options if o.startswith("--"))


def test_the_worker_refuses_an_option_it_does_not_know(capsys):
    worker = pytest.importorskip("ppo_feedback.worker")
    with pytest.raises(SystemExit) as exited:
        worker.main(["--db", "unused.db", "--port", "7860"])
    assert exited.value.code == 2 and "unrecognized arguments: --port 7860" in capsys.readouterr().err


@pytest.mark.parametrize("options, added", [([], 10), (["--worker-nice", "3"], 3), (["--worker-nice", "0"], 0)])
def test_the_worker_lowers_its_priority_before_it_loads_the_model(options, added, capsys):
    """The page comes first: the worker process adds --worker-nice (default 10) to its niceness at start."""
    code = ("import os, sys, ppo_feedback.modeling as modeling\n"
            "def load_model(config):\n"
            "    print('niceness', os.nice(0), flush=True)\n"
            "    raise modeling.ModelSpecError('stop here')\n"
            "modeling.load_model = load_model\n"
            "from ppo_feedback.worker import main\n"
            "sys.exit(main(['--db', 'unused.db', *sys.argv[1:]]))\n")
    done = subprocess.run([sys.executable, "-c", code, *options], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 2 and "stop here" in done.stderr, done.stderr[-2000:]
    assert f"niceness {min(19, os.nice(0) + added)}" in done.stdout
    worker = pytest.importorskip("ppo_feedback.worker")
    assert worker.main(["--db", "unused.db", "--worker-nice", "20"]) == 2  # refused before anything is niced
    assert "--worker-nice must be in 0..19" in capsys.readouterr().err


def test_app_passes_the_worker_exactly_the_options_it_knows():
    """The worker refuses unknown options, so app.py gives it its own options only, with the app's values."""
    worker = pytest.importorskip("ppo_feedback.worker")
    argv = ["--port", "9000", "--host", "localhost", "--poll-interval", "5", "--insecure-no-auth",
            "--model", "smollm2-135m", "--temperature", "0.7", "--max-new-tokens", "12", "--num-candidates", "2",
            "--lora-r", "4", "--batch-size", "4", "--mini-batch-size", "2", "--no-adaptive-kl", "--learning-rate",
            "1e-4", "--reward-l2", "3", "--worker-id", "w1", "--db", "x.db", "--log-level", "DEBUG"]
    args = app.build_parser().parse_args(argv)
    forwarded = app.worker_argv(args, worker.build_parser())
    assert not any(a.startswith(("--port", "--host", "--poll-interval", "--insecure")) for a in forwarded)
    parsed = worker.build_parser().parse_args(forwarded)  # exits 2 on an option the worker does not know
    dests = [a.dest for a in worker.build_parser()._actions if a.option_strings and a.dest != "help"]
    assert {d: getattr(parsed, d) for d in dests} == {d: getattr(args, d) for d in dests}
    assert parsed.adaptive_kl is False and parsed.learning_rate == 1e-4 and parsed.temperature == 0.7
    assert app.worker_argv(app.build_parser().parse_args([]), worker.build_parser()) == []


def test_readme_option_table_is_the_generated_one_and_every_option_exists():
    import re

    from ppo_feedback.config import options_markdown

    readme = (ROOT / "README.md").read_text()
    documented = readme.split("<!-- options:start -->\n", 1)[1].split("\n<!-- options:end -->", 1)[0]
    assert documented == options_markdown(app.ALL_SECTIONS)
    parser_options = {s for a in app.build_parser()._actions for s in a.option_strings}
    for option in re.findall(r"`(--[a-z][a-z0-9-]*)`", documented):
        assert option in parser_options, option
    for action in app.build_parser()._actions:
        if action.option_strings and action.dest != "help":
            assert any(f"`{s}`" in documented for s in action.option_strings), action.option_strings


def test_every_option_says_what_it_sets():
    from dataclasses import fields

    from ppo_feedback.config import field_docs

    for cls, _title in app.ALL_SECTIONS:
        docs = field_docs(cls)
        assert [f.name for f in fields(cls) if not docs.get(f.name, "").strip()] == [], cls.__name__


def test_reward_model_options_reach_the_workers_reward_config(monkeypatch):
    from ppo_feedback.config import from_namespace
    from ppo_feedback.rewards import RewardConfig
    from ppo_feedback.worker import build_parser

    assert from_namespace(RewardConfig, build_parser().parse_args([])) == RewardConfig()
    assert RewardConfig().reward_l2 is None  # chosen by cross-validation
    argv = ["--reward-l2", "3", "--prior-weight", "2", "--reward-holdout", "0.1", "--feature-batch-size", "4",
            "--batch-size", "8"]
    config = from_namespace(RewardConfig, build_parser().parse_args(argv))
    assert (config.reward_l2, config.prior_weight, config.reward_holdout, config.feature_batch_size) \
        == (3.0, 2.0, 0.1, 4)
    assert app.build_parser().parse_args(argv).batch_size == 8  # the PPO batch size: no clash
    monkeypatch.setenv("PPO_FEEDBACK_REWARD_L2", "0.5")
    assert from_namespace(RewardConfig, build_parser().parse_args([])).reward_l2 == 0.5
