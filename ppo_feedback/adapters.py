"""Versioned adapter store: `adapters/v0001/`, `v0002/`, ... published atomically, loaded in place.

A version directory holds the PEFT adapter (`adapter_config.json`, `adapter_model.safetensors`),
`value_head.safetensors` and `metadata.json` (base model, version, parent, feedback counts and
cursor, metrics, time, and the sha256 of every other file). Safetensors and JSON only: nothing is
ever unpickled.

Publishing writes into `.tmp-*` inside the adapters directory, fsyncs every file and the directory,
renames it to `vNNNN`, fsyncs the adapters directory, then records the version in the store in one
transaction. A crash leaves either a `.tmp-*` directory (ignored by readers, removed by the next
publish) or a complete `vNNNN` directory that the store does not list (never served; removed by a
later `clean_stale(store)`). Readers find a version as `root/vNNNN`, never through the path stored
in the database, so the UI and the worker may mount the shared directory at different places.

One publisher at a time (the worker holding the training lease): a publish removes every `.tmp-*`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch

from db.records import BASE_VERSION, Cursor
from .policy import ADAPTER_WEIGHTS, VALUE_HEAD_WEIGHTS, AdapterLoadError, PolicyWithValueHead

log = logging.getLogger(__name__)

METADATA = "metadata.json"
FORMAT = "ppo-feedback-adapter/1"
TMP_PREFIX = ".tmp-"
WEIGHT_FILES = (ADAPTER_WEIGHTS, VALUE_HEAD_WEIGHTS)  # what loading reads, so what loading verifies
VERSION_DIR = re.compile(r"^v(\d{4,})$")
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


class VersionConflict(RuntimeError):
    """Another publisher took this version number first; nothing of this publish was kept."""


# ------------------------------------------------------------------------ in-memory weights

def _adapter_parameters(policy: PolicyWithValueHead) -> dict[str, torch.nn.Parameter]:
    """Return {name: parameter} of the weights an adapter version holds: every LoRA tensor and the value head."""
    return {name: p for name, p in policy.named_parameters()
            if "lora_" in name or name.startswith("value_head.")}


class AdapterState:
    """An in-memory copy of a policy's LoRA and value-head weights, restorable in place in about a millisecond."""

    def __init__(self, policy: PolicyWithValueHead):
        self._params = _adapter_parameters(policy)
        self._saved = {name: p.detach().clone() for name, p in self._params.items()}

    @classmethod
    def capture(cls, policy: PolicyWithValueHead) -> AdapterState:
        """Return a copy of the policy's current adapter weights."""
        return cls(policy)

    @classmethod
    def initial(cls, policy: PolicyWithValueHead) -> AdapterState:
        """Return version 0 for a policy fresh from `add_lora`: its untrained LoRA and a zero value head."""
        state = cls(policy)
        for name, saved in state._saved.items():
            if name.startswith("value_head."):
                saved.zero_()
        return state

    @torch.no_grad()
    def restore(self) -> None:
        """Copy the saved weights back into the policy they were taken from; returns nothing."""
        for name, p in self._params.items():
            p.copy_(self._saved[name])


@torch.no_grad()
def reset_to_base(policy: PolicyWithValueHead) -> None:
    """Make the policy compute the base model exactly (every LoRA B and the value head zeroed); returns nothing."""
    for name, p in _adapter_parameters(policy).items():
        if "lora_B" in name or name.startswith("value_head."):
            p.zero_()


# ------------------------------------------------------------------------------- reading

def version_dir_name(version: int) -> str:
    """Return the directory name of a version: `v0001` (more digits past 9999)."""
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"adapter versions start at 1, not {version!r}")
    return f"v{version:04d}"


def sha256_file(path: Path) -> str:
    """Return the hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_metadata(directory: Path, version: int | None = None) -> dict[str, Any]:
    """Return a version directory's metadata.json; raise AdapterLoadError if missing, corrupt or for another version."""
    try:
        meta = json.loads((directory / METADATA).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise AdapterLoadError(f"{directory}: cannot read {METADATA} ({exc})") from exc
    if not isinstance(meta, dict) or not isinstance(meta.get("files"), dict):
        raise AdapterLoadError(f"{directory}: {METADATA} is not an adapter version's metadata")
    if version is not None and meta.get("version") != version:
        raise AdapterLoadError(f"{directory}: {METADATA} says version {meta.get('version')!r}, not {version}")
    return meta


def verify_directory(directory: Path, version: int | None = None, *, all_files: bool = False) -> dict[str, Any]:
    """Check a version directory against its metadata checksums; return the metadata.

    Checks the weight files loading reads (every listed file with `all_files`). Raises
    AdapterLoadError naming the first missing or altered file.
    """
    meta = read_metadata(directory, version)
    files: dict[str, str] = meta["files"]
    for name in (files if all_files else WEIGHT_FILES):
        if name not in files:
            raise AdapterLoadError(f"{directory}: {METADATA} lists no checksum for {name}")
        try:
            actual = sha256_file(directory / name)
        except OSError as exc:
            raise AdapterLoadError(f"{directory}: cannot read {name} ({exc})") from exc
        if actual != files[name]:
            raise AdapterLoadError(f"{directory}: {name} is corrupt (sha256 differs from the published one)")
    return meta


def apply_version(policy: PolicyWithValueHead, root: str | Path, version: int, *,
                  initial: AdapterState | None = None, verify: bool = True) -> Path | None:
    """Load `version` into the policy in place (0 = the base model); return its directory (None for 0).

    Version 0 restores `initial` (the adapter as `add_lora` made it, value head zero) or, without
    it, zeroes every LoRA B matrix and the value head. Other versions are checked against their
    published checksums (skip with `verify=False` when the caller just did) and then copied in by
    `policy.load_adapter`. Raises AdapterLoadError, leaving the weights untouched, when the files
    are missing, corrupt, or do not fit this model.
    """
    if version == BASE_VERSION:
        if initial is not None:
            initial.restore()
        else:
            reset_to_base(policy)
        return None
    directory = Path(root) / version_dir_name(version)
    if verify:
        verify_directory(directory, version)
    policy.load_adapter(directory)
    return directory


# ------------------------------------------------------------------------------ writing

def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    if os.name == "nt":  # Windows cannot open a directory to fsync it
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    """Delete a directory so that no reader ever sees it half-deleted: rename it to `.tmp-*` first.

    Logs instead of raising, because it runs while another error is on its way up.
    """
    doomed = path
    try:
        if not path.name.startswith(TMP_PREFIX):
            doomed = path.with_name(f"{TMP_PREFIX}removed-{path.name}-{os.getpid()}-{os.urandom(4).hex()}")
            os.rename(path, doomed)
            _fsync_dir(path.parent)
    except OSError as exc:
        log.warning("could not set %s aside for removal (%s)", path, exc)
    shutil.rmtree(doomed, ignore_errors=True)


class AdapterStore:
    """The adapters directory: publish versions atomically, find and check them, clean up after crashes."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, version: int) -> Path:
        """Return the directory of `version` (it may not exist)."""
        return self.root / version_dir_name(version)

    def versions_on_disk(self) -> list[int]:
        """Return the version numbers that have a `vNNNN` directory, ascending (published or not)."""
        if not self.root.is_dir():
            return []
        found = (VERSION_DIR.match(entry.name) for entry in self.root.iterdir() if entry.is_dir())
        return sorted(int(match.group(1)) for match in found if match)

    def next_version(self, store) -> int:
        """Return the number the next publish will take: one past the store's newest and the newest on disk."""
        on_disk = self.versions_on_disk()
        return max(store.next_version_number(), (on_disk[-1] + 1) if on_disk else 1)

    def read_metadata(self, version: int) -> dict[str, Any]:
        """Return the metadata of `version`; raise AdapterLoadError if it is missing or corrupt."""
        return read_metadata(self.path(version), version)

    def verify(self, version: int, *, all_files: bool = False) -> dict[str, Any]:
        """Check `version`'s weight files (every file with `all_files`) against their checksums; return its metadata."""
        return verify_directory(self.path(version), version, all_files=all_files)

    def clean_stale(self, store=None) -> list[Path]:
        """Remove what crashed publishes left behind; return the paths removed.

        Always the `.tmp-*` entries; with a store, also `vNNNN` directories the store has no row
        for and whose number is below the store's next one (so no publish can still claim them).
        """
        removed: list[Path] = []
        if not self.root.is_dir():
            return removed
        for entry in self.root.iterdir():
            if entry.name.startswith(TMP_PREFIX):
                if entry.is_dir():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
                removed.append(entry)
        if store is not None:
            known = {row.version for row in store.list_versions()}
            below = store.next_version_number()
            for version in self.versions_on_disk():
                if version not in known and version < below:
                    log.warning("removing %s: a publish crashed before the store recorded it", self.path(version))
                    _remove(self.path(version))
                    removed.append(self.path(version))
        return removed

    def publish(self, policy: PolicyWithValueHead, store, *, base_model: str, parent: int, cursor: Cursor,
                n_ratings: int, n_preferences: int, metrics: Mapping[str, Any] | None = None,
                holder: str | None = None, extra_files: Mapping[str, bytes | str | Path] | None = None,
                write_extra: Callable[[Path], None] | None = None) -> int:
        """Write the policy's adapter as the next version and publish it in the store; return its number.

        `extra_files` maps file names to bytes or to a file to copy; `write_extra(directory)` may
        write more (e.g. `trainer.save_state`). The number is `next_version(store)`. If another
        publisher took it, raises VersionConflict; if the store refuses the version (lease lost,
        parent rolled back, ...) its error is raised. Either way no `vNNNN` of this call remains.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        self.clean_stale(store)
        extras = dict(extra_files or {})
        for name in extras:
            if not SAFE_NAME.match(name) or name == METADATA or name in WEIGHT_FILES:
                raise ValueError(f"extra file name {name!r} is not a plain file name or clashes with the adapter's")
        metadata = {
            "format": FORMAT, "version": None, "parent": parent, "base_model": base_model,
            "n_ratings": n_ratings, "n_preferences": n_preferences,
            "cursor": {"rating_id": cursor.rating_id, "preference_id": cursor.preference_id},
            "metrics": dict(metrics or {}), "created_at": datetime.now(timezone.utc).isoformat(),
        }
        json.dumps(metadata, allow_nan=False)  # fail before writing anything on NaN or non-JSON metrics
        version = self.next_version(store)
        metadata["version"] = version
        final = self.path(version)

        staging = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=self.root))
        try:
            self._write(staging, policy, metadata, extras, write_extra)
            try:
                os.rename(staging, final)  # refused when `final` exists: version directories are never empty
            except OSError as exc:
                if final.exists():
                    raise VersionConflict(f"{final} exists: another publisher took version {version}") from exc
                raise
        except BaseException:
            _remove(staging)
            raise
        try:
            _fsync_dir(self.root)
            store.publish_version(version, str(final.resolve()), parent, cursor=cursor, n_ratings=n_ratings,
                                  n_preferences=n_preferences, metrics=metrics, holder=holder)
        except BaseException:
            _remove(final)  # the store did not take it: leave no version directory behind
            raise
        log.info("published adapter version %d (parent %d) in %s", version, parent, final)
        return version

    @staticmethod
    def _write(directory: Path, policy: PolicyWithValueHead, metadata: dict[str, Any],
               extras: dict[str, bytes | str | Path], write_extra: Callable[[Path], None] | None) -> None:
        """Write every file of a version into `directory`, with checksums in metadata.json, and fsync them."""
        policy.save_adapter(directory)
        if write_extra is not None:
            write_extra(directory)
        for name, content in extras.items():
            if isinstance(content, (bytes, bytearray)):
                (directory / name).write_bytes(content)
            else:
                shutil.copyfile(content, directory / name)
        files = sorted(p for p in directory.iterdir() if p.is_file() and p.name != METADATA)
        missing = [name for name in WEIGHT_FILES if not (directory / name).is_file()]
        if missing:
            raise AdapterLoadError(f"saving the adapter wrote no {', '.join(missing)}")
        metadata["files"] = {p.name: sha256_file(p) for p in files}
        (directory / METADATA).write_text(json.dumps(metadata, indent=2, allow_nan=False), encoding="utf-8")
        for p in [*files, directory / METADATA]:
            _fsync_file(p)
        _fsync_dir(directory)


def rollback(store, root: str | Path, version: int, *, policy: PolicyWithValueHead | None = None) -> list[int]:
    """Make the store serve `version` again (0 = base) once it is known to load; return the versions rolled back.

    Checks the version's files against their checksums and, given a policy, loads it for real and
    restores the policy's weights afterwards (the caller holds whatever lock guards the policy).
    Raises AdapterLoadError before telling the store anything when the version cannot be served.
    """
    if version != BASE_VERSION:
        directory = Path(root) / version_dir_name(version)
        if not directory.is_dir():
            raise AdapterLoadError(f"{directory}: version {version} is not on disk")
        verify_directory(directory, version)
        if policy is not None:
            saved = AdapterState.capture(policy)
            try:
                policy.load_adapter(directory)
            finally:
                saved.restore()
    return store.rollback_to(version)
