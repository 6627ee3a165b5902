"""`python -m ppo_feedback COMMAND ...`: the project's sub-commands.

    python -m ppo_feedback export --version N --out DIR [...]   adapter folder, merged model or zip
    python -m ppo_feedback COMMAND --help                       a command's own options

Each command is a module with `main(argv: list[str] | None) -> int`, imported only when it runs
(so `--help` here stays fast). To add one, add a line to COMMANDS.

These run as their own modules, not through this dispatcher:
    python -m ppo_feedback.worker     the training worker (app.py starts it unless --no-worker)
    python -m ppo_feedback.auth       manage the users file of the page (--auth-file)
"""
from __future__ import annotations

import importlib
import sys

# name -> (module with main(argv) -> int, one-line description)
COMMANDS: dict[str, tuple[str, str]] = {
    "export": ("ppo_feedback.export", "export an adapter version as a PEFT folder, merged model or zip"),
    # "name": ("ppo_feedback.module", "what it does"),  <- other commands go here
}


def usage() -> str:
    """Return the usage text: the commands and what each does."""
    width = max(map(len, COMMANDS))
    lines = ["usage: python -m ppo_feedback COMMAND [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {description}" for name, (_module, description) in COMMANDS.items()]
    lines += ["", "`python -m ppo_feedback COMMAND --help` lists a command's options.",
              "Separate modules: python -m ppo_feedback.worker, python -m ppo_feedback.auth"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the sub-command named by the first argument; return its exit code (2 for an unknown one)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
