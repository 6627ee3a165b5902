"""Command line of the feedback store.

python -m db export --db data/feedback.db --format preference --out prefs.jsonl
python -m db upgrade --db postgresql+psycopg://user:pw@host/db
"""

from __future__ import annotations

import argparse
import sys

from db.engine import DEFAULT_DB_PATH
from db.export import FORMATS, export_jsonl
from db.store import FeedbackStore


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the process exit status."""
    parser = argparse.ArgumentParser(prog="python -m db", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="write ratings or preferences as JSONL")
    export.add_argument("--db", default=DEFAULT_DB_PATH, help="SQLAlchemy URL or SQLite file path")
    export.add_argument("--format", required=True, choices=sorted(FORMATS))
    export.add_argument("--out", required=True, help="output file, or - for stdout")
    upgrade = commands.add_parser("upgrade", help="create the database or upgrade its schema in place")
    upgrade.add_argument("--db", default=DEFAULT_DB_PATH, help="SQLAlchemy URL or SQLite file path")
    args = parser.parse_args(argv)

    with FeedbackStore(args.db) as store:
        if args.command == "export":
            count = export_jsonl(store, args.format, args.out)
            print(f"wrote {count} {args.format} rows to {args.out}", file=sys.stderr)
        else:
            print(f"database at schema revision {store.schema_revision()}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
