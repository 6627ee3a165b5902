"""Print one of the README's commands, so CI runs exactly what a newcomer types.

    python .ci/readme_command.py install   # the install part of "Install and run" (without `&& python app.py`)
    python .ci/readme_command.py test      # the "Test" command

The README marks each command's code block with an HTML comment on the line above the fence
(`<!-- command:install-and-run -->`, `<!-- command:test -->`); the block must hold one line.
Standard library only: it runs before anything is installed.
"""
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"
RUN_SUFFIX = " && python app.py"


def marked_command(marker: str, text: str) -> str:
    """Return the one-line command in the code block right after `<!-- command:MARKER -->`."""
    lines = text.splitlines()
    tag = f"<!-- command:{marker} -->"
    if lines.count(tag) != 1:
        raise SystemExit(f"readme_command: README.md must mark exactly one block with {tag}")
    start = lines.index(tag) + 1
    if not lines[start].startswith("```"):
        raise SystemExit(f"readme_command: {tag} must be followed by a code fence")
    end = lines.index("```", start + 1)
    body = [line for line in lines[start + 1:end] if line.strip()]
    if len(body) != 1:
        raise SystemExit(f"readme_command: the block after {tag} must hold one command line")
    return body[0].strip()


def main(which: str) -> str:
    """Return the install part of the install-and-run command, or the test command."""
    text = README.read_text(encoding="utf-8")
    if which == "install":
        command = marked_command("install-and-run", text)
        if not command.endswith(RUN_SUFFIX):
            raise SystemExit(f"readme_command: the install-and-run command must end with '{RUN_SUFFIX.strip()}'")
        return command[: -len(RUN_SUFFIX)]
    if which == "test":
        return marked_command("test", text)
    raise SystemExit("usage: readme_command.py install|test")


if __name__ == "__main__":
    print(main(sys.argv[1] if len(sys.argv) > 1 else ""))
