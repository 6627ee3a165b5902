"""ppo-feedback: rate a language model's generations in the browser; PPO learns from the ratings.

Usage: python app.py [--model gpt2|smollm2-135m|DIR|FILE.gguf] [--port 7860] ...  (--help lists all)
"""
from __future__ import annotations

import argparse
import logging
import sys

from ppo_feedback.config import AppConfig, LoraSettings, ModelConfig, SamplingConfig, add_dataclass_arguments, \
    from_namespace

SECTIONS = ((ModelConfig, "model"), (LoraSettings, "LoRA"), (SamplingConfig, "sampling"), (AppConfig, "app"))


def build_parser() -> argparse.ArgumentParser:
    """Return the command-line parser; every option also reads PPO_FEEDBACK_<OPTION> from the environment."""
    parser = argparse.ArgumentParser(prog="app.py", description=__doc__.splitlines()[0])
    for cls, title in SECTIONS:
        add_dataclass_arguments(parser, cls, title)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, load the model and serve the page; return the exit code."""
    args = build_parser().parse_args(argv)
    try:
        model_cfg, _lora, sampling, app_cfg = (from_namespace(cls, args) for cls, _ in SECTIONS)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=app_cfg.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from ppo_feedback.modeling import ModelSpecError, load_model
    from ppo_feedback.ui import build_demo

    try:
        loaded = load_model(model_cfg)
    except ModelSpecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    build_demo(loaded, sampling).launch(server_name=app_cfg.host, server_port=app_cfg.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
