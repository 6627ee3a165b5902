"""ppo-feedback: rate a language model's generations in the browser; PPO learns from the ratings.

Usage: python app.py [--model gpt2|smollm2-135m|DIR|FILE.gguf] [--port 7860] ...  (--help lists all)
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from ppo_feedback.config import WORKER_SECTIONS, AppConfig, LoraSettings, ModelConfig, SamplingConfig, \
    add_dataclass_arguments, add_worker_arguments, configure_logging, from_namespace, options_markdown
from ppo_feedback.supervisor import Supervisor, stop_worker  # noqa: F401  (app.stop_worker for scripts)

SECTIONS = ((ModelConfig, "model"), (LoraSettings, "LoRA"), (SamplingConfig, "sampling"), (AppConfig, "app"))
# every option of app.py, for the README's configuration reference (`python app.py --options-reference`)
ALL_SECTIONS = SECTIONS + WORKER_SECTIONS
WORKER_MODULE = "ppo_feedback.worker"
ROOT = Path(__file__).resolve().parent

log = logging.getLogger("app")


def build_parser() -> argparse.ArgumentParser:
    """Return the command-line parser; every option also reads PPO_FEEDBACK_<OPTION> from the environment."""
    parser = argparse.ArgumentParser(prog="app.py", description=__doc__.splitlines()[0])
    for cls, title in SECTIONS:
        add_dataclass_arguments(parser, cls, title)
    add_worker_arguments(parser)
    return parser


def _terminate_with_parent() -> None:
    """In the worker child (Linux): receive SIGTERM if the app dies without stopping it (PR_SET_PDEATHSIG)."""
    import ctypes

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)


def worker_argv(args: argparse.Namespace, worker_parser: argparse.ArgumentParser) -> list[str]:
    """Return the worker's command line for the parsed app options: every option of `worker_parser` whose
    value in `args` differs from its default (the worker reads the same environment), and no other."""
    argv = []
    for action in worker_parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        value = getattr(args, action.dest)
        if value == action.default:
            continue
        if isinstance(action, argparse.BooleanOptionalAction):  # --flag / --no-flag
            argv.append(action.option_strings[0 if value else 1])
        else:
            argv.append(f"{action.option_strings[0]}={value}")
    return argv


def start_worker(argv: list[str]) -> tuple[subprocess.Popen | None, str | None]:
    """Start the training worker as a child process with the command line `argv`; return it, or None and why not."""
    preexec = _terminate_with_parent if sys.platform.startswith("linux") else None
    # the package is found from any working directory; relative paths (--db, --adapters-dir) stay the caller's
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    proc = subprocess.Popen([sys.executable, "-m", WORKER_MODULE, *argv], preexec_fn=preexec,
                            env={**os.environ, "PYTHONPATH": path})
    log.info("started the training worker (pid %d)", proc.pid)
    return proc, None


def supervise_worker(argv: list[str], store=None, **backoff) -> Supervisor:
    """Start the training worker with the command line `argv` and restart it whenever it exits (with a back-off:
    `Supervisor`'s keyword arguments); return the running supervisor, whose `state()` the status panel shows.

    Without `--worker-id` in `argv` every child gets this app's (`host:pid/worker`), so a restarted child
    takes its crashed predecessor's lease at once (fencing it off) instead of waiting `--lease-ttl` for it
    to expire; and, given the `store`, the app releases that lease as soon as a child exits, so the status
    panel says so at once instead of showing the dead worker's last state until the lease expires."""
    on_exit = None
    if not any(arg == "--worker-id" or arg.startswith("--worker-id=") for arg in argv):
        holder = f"{socket.gethostname()}:{os.getpid()}/worker"
        argv = [*argv, f"--worker-id={holder}"]
        if store is not None:
            on_exit = lambda why: store.release_lease(holder, state=why)  # noqa: E731
    return Supervisor(lambda: start_worker(argv)[0], on_exit=on_exit, **backoff).start()


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, load the model, start the worker and serve the page; return the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv == ["--options-reference"]:
        print(options_markdown(ALL_SECTIONS))
        return 0
    args = build_parser().parse_args(argv)
    try:
        model_cfg, lora, sampling, app_cfg = (from_namespace(cls, args) for cls, _ in SECTIONS)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    configure_logging(app_cfg.log_level)
    from db import FeedbackStore
    from ppo_feedback.auth import AuthFileError, UserDirectory
    from ppo_feedback.modeling import ModelSpecError
    from ppo_feedback.serving import ServingModel
    from ppo_feedback.page import FeedbackApp, build_demo, builtin_prompts, launch_options

    try:
        users = UserDirectory(app_cfg.auth_file) if app_cfg.auth_file else None
    except AuthFileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    store = FeedbackStore(app_cfg.db, max_prompt_chars=sampling.max_prompt_chars)
    store.add_prompts(builtin_prompts(), source="builtin")
    try:
        serving = ServingModel.load(model_cfg, lora, store, app_cfg.adapters_dir, sampling=sampling,
                                    weights=app_cfg.serving_weights)
    except ModelSpecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    serving.start_polling(app_cfg.poll_interval)
    worker, worker_note = None, "no worker started here (--no-worker)"
    if app_cfg.worker:
        from ppo_feedback.worker import build_parser as worker_parser

        worker = supervise_worker(worker_argv(args, worker_parser()), store)
        worker_note = worker.state
    feedback_app = FeedbackApp(serving, store, sampling, users=users, adapters_dir=app_cfg.adapters_dir,
                               worker_note=worker_note, model_cache_dir=model_cfg.cache_dir,
                               overlap=app_cfg.overlap, mix_versions=app_cfg.mix_versions,
                               queue_size=app_cfg.queue_size, generations_per_user=app_cfg.generations_per_user)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # run the clean-up below on `kill` too
    try:
        build_demo(feedback_app).launch(server_name=app_cfg.host, server_port=app_cfg.port,
                                        **launch_options(feedback_app, app_cfg))
    finally:
        if worker is not None:
            worker.stop()
        serving.stop()
        feedback_app.close()
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
