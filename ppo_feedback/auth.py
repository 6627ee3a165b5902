"""Users of the page: a JSON users file with PBKDF2-hashed passwords and an admin flag.

The file (`--auth-file users.json` or PPO_FEEDBACK_AUTH_FILE) looks like

    {"users": {"ana": {"password": "pbkdf2_sha256$600000$<salt>$<hash>", "admin": true},
               "ben": {"password": "pbkdf2_sha256$600000$<salt>$<hash>"}}}

Passwords are never stored in clear: a password field that is not a PBKDF2 hash makes the file
refuse to load. Create and edit the file with

    python -m ppo_feedback.auth add users.json ana --admin     # asks for the password twice
    python -m ppo_feedback.auth remove users.json ben
    python -m ppo_feedback.auth list users.json

The running app re-reads the file when it changes, so adding a user needs no restart.
"""
from __future__ import annotations

import argparse
import base64
import getpass
import hashlib
import hmac
import json
import os
import secrets
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

SCHEME = "pbkdf2_sha256"
DEFAULT_ITERATIONS = 600_000  # OWASP's 2023 recommendation for PBKDF2-HMAC-SHA256
MIN_ITERATIONS = 1_000
SALT_BYTES = 16


class AuthFileError(ValueError):
    """The users file is missing, not valid JSON, or holds a password that is not hashed."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def hash_password(password: str, iterations: int = DEFAULT_ITERATIONS) -> str:
    """Return `pbkdf2_sha256$<iterations>$<salt>$<hash>` (base64) for a password, with a fresh random salt."""
    if not isinstance(password, str) or not password:
        raise ValueError("the password is empty")
    if iterations < MIN_ITERATIONS:
        raise ValueError(f"use at least {MIN_ITERATIONS} iterations")
    salt = secrets.token_bytes(SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt, iterations)
    return f"{SCHEME}${iterations}${_b64(salt)}${_b64(digest)}"


def _parse_hash(encoded: object) -> tuple[int, bytes, bytes] | None:
    """Return (iterations, salt, digest) of an encoded hash, or None when it is not one."""
    if not isinstance(encoded, str):
        return None
    parts = encoded.split("$")
    if len(parts) != 4 or parts[0] != SCHEME:
        return None
    try:
        iterations = int(parts[1])
        salt, digest = base64.b64decode(parts[2], validate=True), base64.b64decode(parts[3], validate=True)
    except ValueError:
        return None
    if iterations < MIN_ITERATIONS or not salt or len(digest) != 32:
        return None
    return iterations, salt, digest


def verify_password(password: str, encoded: str) -> bool:
    """Return whether `password` matches the encoded hash (compared in constant time)."""
    parsed = _parse_hash(encoded)
    if parsed is None or not isinstance(password, str):
        return False
    iterations, salt, digest = parsed
    candidate = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt, iterations)
    return hmac.compare_digest(candidate, digest)


@dataclass(frozen=True)
class User:
    name: str
    password_hash: str
    admin: bool = False


def dummy_hash(users: dict[str, User]) -> str:
    """Return a hash no password matches, as costly to check as the users' own (their highest iteration
    count; DEFAULT_ITERATIONS when there are none): what a login with an unknown name is checked against."""
    counts = [parsed[0] for u in users.values() if (parsed := _parse_hash(u.password_hash)) is not None]
    iterations = max(counts, default=DEFAULT_ITERATIONS)
    return f"{SCHEME}${iterations}${_b64(secrets.token_bytes(SALT_BYTES))}${_b64(secrets.token_bytes(32))}"


def parse_users(data: object, source: str = "users file") -> dict[str, User]:
    """Return {name: User} from the decoded JSON of a users file; raise AuthFileError when it is malformed."""
    if not isinstance(data, dict) or not isinstance(data.get("users"), dict):
        raise AuthFileError(f'{source}: expected {{"users": {{"name": {{"password": ..., "admin": ...}}}}}}')
    users: dict[str, User] = {}
    for name, entry in data["users"].items():
        if not name.strip() or name != name.strip():
            raise AuthFileError(f"{source}: user name {name!r} is blank or has surrounding spaces")
        if not isinstance(entry, dict):
            raise AuthFileError(f"{source}: user {name!r} must be an object with a password hash")
        if _parse_hash(entry.get("password")) is None:
            raise AuthFileError(
                f"{source}: the password of user {name!r} is not a {SCHEME} hash (passwords are never stored "
                f"in clear); set it with: python -m ppo_feedback.auth add {source} {name}")
        admin = entry.get("admin", False)
        if not isinstance(admin, bool):
            raise AuthFileError(f"{source}: 'admin' of user {name!r} must be true or false")
        users[name] = User(name, entry["password"], admin)
    if not users:
        raise AuthFileError(f"{source}: no users; add one with: python -m ppo_feedback.auth add {source} NAME")
    return users


def read_users_file(path: str | os.PathLike[str]) -> dict[str, User]:
    """Return the users of a users file; raise AuthFileError when it cannot be used."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise AuthFileError(f"cannot read the users file {path}: {exc.strerror or exc}") from exc
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise AuthFileError(f"{path}: not valid JSON ({exc})") from exc
    return parse_users(data, str(path))


def write_users_file(path: str | os.PathLike[str], users: dict[str, User]) -> None:
    """Write the users atomically, readable by the owner only; returns nothing."""
    path = Path(path)
    data = {"users": {u.name: ({"password": u.password_hash, "admin": True} if u.admin
                               else {"password": u.password_hash}) for u in users.values()}}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, sort_keys=True)
        handle.write("\n")
    os.replace(tmp, path)


class UserDirectory:
    """The users file as the running app sees it: checks logins and admin rights, re-reading the file on change.

    If the file becomes unreadable or malformed while the app runs, the last good users stay in
    force (and the error is kept in `last_error`) rather than locking everyone out.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self.last_error: str | None = None
        self._lock = threading.Lock()
        self._stamp = self._file_stamp()
        self._users = read_users_file(self.path)  # raises AuthFileError at start-up
        self._dummy_hash = dummy_hash(self._users)

    def _file_stamp(self) -> tuple[int, int] | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size

    def users(self) -> dict[str, User]:
        """Return the current users, re-reading the file if it changed since the last look."""
        stamp = self._file_stamp()
        with self._lock:
            if stamp != self._stamp:
                self._stamp = stamp
                try:
                    self._users = read_users_file(self.path)
                    self._dummy_hash = dummy_hash(self._users)
                    self.last_error = None
                except AuthFileError as exc:
                    self.last_error = str(exc)
            return self._users

    def check(self, username: str, password: str) -> bool:
        """Return whether the login is valid (the callable given to Gradio's `launch(auth=...)`)."""
        user = self.users().get(username) if isinstance(username, str) else None
        if user is None:  # the same hashing cost as a real user's, so timing does not tell which names exist
            verify_password(password if isinstance(password, str) else "", self._dummy_hash)
            return False
        return verify_password(password, user.password_hash)

    def exists(self, username: str | None) -> bool:
        """Return whether `username` is in the users file now (a removed user's sessions end with this)."""
        return isinstance(username, str) and username in self.users()

    def is_admin(self, username: str | None) -> bool:
        """Return whether `username` is listed as an admin."""
        user = self.users().get(username) if username else None
        return bool(user and user.admin)


# ---------------------------------------------------------------------------------- command line

def _read_new_password(args: argparse.Namespace) -> str:
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = getpass.getpass(f"Password for {args.name}: ")
        if getpass.getpass("Again: ") != password:
            raise SystemExit("error: the passwords differ")
    if not password:
        raise SystemExit("error: the password is empty")
    return password


def main(argv: list[str] | None = None) -> int:
    """Add, remove or list the users of a users file; return the exit code."""
    parser = argparse.ArgumentParser(prog="python -m ppo_feedback.auth",
                                     description="Manage the users file of the ppo-feedback page.")
    sub = parser.add_subparsers(dest="command", required=True)
    add = sub.add_parser("add", help="add a user or set a user's password (asked for twice)")
    add.add_argument("file")
    add.add_argument("name")
    add.add_argument("--admin", action=argparse.BooleanOptionalAction, default=None,
                     help="make the user an admin (--no-admin takes it away; default: keep, or not admin)")
    add.add_argument("--password-stdin", action="store_true", help="read the password from one line of stdin")
    add.add_argument("--iterations", type=int, default=DEFAULT_ITERATIONS, help=argparse.SUPPRESS)
    remove = sub.add_parser("remove", help="remove a user")
    remove.add_argument("file")
    remove.add_argument("name")
    show = sub.add_parser("list", help="list the users and who is an admin")
    show.add_argument("file")
    args = parser.parse_args(argv)

    path = Path(args.file)
    try:
        users = read_users_file(path) if (path.exists() or args.command != "add") else {}
    except AuthFileError as exc:
        if args.command == "add" and "no users" in str(exc):
            users = {}
        else:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    if args.command == "list":
        for user in sorted(users.values(), key=lambda u: u.name):
            print(f"{user.name}{'  (admin)' if user.admin else ''}")
        return 0
    name = args.name.strip()
    if not name or name != args.name:
        print("error: the user name is blank or has surrounding spaces", file=sys.stderr)
        return 2
    if args.command == "remove":
        if name not in users:
            print(f"error: no user {name!r} in {path}", file=sys.stderr)
            return 2
        del users[name]
        if not users:
            print("error: refusing to remove the last user", file=sys.stderr)
            return 2
    else:
        admin = args.admin if args.admin is not None else (users[name].admin if name in users else False)
        users[name] = User(name, hash_password(_read_new_password(args), args.iterations), admin)
    write_users_file(path, users)
    print(f"{args.command}: {name} ({path})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
