"""Adapter versions: the weights in a live policy, the `adapters/` directory, and one lifecycle over both and the store.

`VersionLifecycle` is the one way a version is published, checked, loaded and rolled back: it
writes the folder and the store row from one `VersionRecord`. The folder format and its checks
are in `versions.py`.

Publishing writes into `.tmp-*` inside the adapters directory, fsyncs every file and the directory,
renames it to `vNNNN`, fsyncs the adapters directory, then records the version in the store in one
transaction. A crash leaves either a `.tmp-*` directory (ignored by readers, removed by the next
publish) or a complete `vNNNN` directory that the store does not list (never served; removed by a
later `clean_stale(store)`). Readers find a version as `root/vNNNN`, never through the path stored
in the database, so the UI and the worker may mount the shared directory at different places.

One publisher at a time (the worker holding the training lease under a fencing token): a publish
stages in `.tmp-tNNNNNNNNNN-*` named by its token and removes only staging folders of older tokens
(whose holders can no longer publish) and untokened leftovers, never a newer holder's.

Version folders are mode 0755 and their files 0644 whatever the umask (`DIR_MODE`, `FILE_MODE`), so a
page and a worker running as different users can both read them.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from db.records import BASE_VERSION, VersionRecord
from .policy import PolicyWithValueHead
from .versions import (
    METADATA,
    WEIGHT_FILES,
    AdapterLoadError,
    read_metadata,
    sha256_file,
    verify_directory,
    version_dir,
    version_metadata,
)

log = logging.getLogger(__name__)

TMP_PREFIX = ".tmp-"
VERSION_DIR = re.compile(r"^v(\d{4,})$")
TOKENED_TMP = re.compile(r"^\.tmp-t(\d+)-")
DIR_MODE, FILE_MODE = 0o755, 0o644  # readable by every user, writable by the worker's


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
    def interpolate(self, toward: AdapterState, fraction: float) -> None:
        """Set the policy's weights `fraction` of the way from this copy to `toward` (a later copy of the same
        policy), each tensor on the line between the two: 0 restores this copy, 1 restores `toward`; returns
        nothing."""
        for name, p in self._params.items():
            p.copy_(torch.lerp(self._saved[name], toward._saved[name], fraction))


@torch.no_grad()
def reset_to_base(policy: PolicyWithValueHead) -> None:
    """Make the policy compute the base model exactly (every LoRA B and the value head zeroed); returns nothing."""
    for name, p in _adapter_parameters(policy).items():
        if "lora_B" in name or name.startswith("value_head."):
            p.zero_()


@torch.no_grad()
def shrink_toward_base(policy: PolicyWithValueHead, factor: float) -> None:
    """Scale the adapter's change to the base model by `factor` (every LoRA B: B·A becomes factor·B·A, so
    the policy moves that far back toward the base, 0 being the base itself); returns nothing."""
    for name, p in _adapter_parameters(policy).items():
        if "lora_B" in name:
            p.mul_(factor)


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
    directory = version_dir(root, version)
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
    """The adapters directory: write versions atomically, find and check them, clean up after crashes."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, version: int) -> Path:
        """Return the directory of `version` (it may not exist)."""
        return version_dir(self.root, version)

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

    def clean_stale(self, store=None, token: int | None = None) -> list[Path]:
        """Remove what crashed publishes left behind; return the paths removed.

        The `.tmp-*` entries, except staging folders of a publisher holding lease token `token` or a
        newer one (all tokened ones without `token`); with a store, also `vNNNN` directories the store
        has no row for and whose number is below the store's next one (so no publish can still claim them).
        """
        removed: list[Path] = []
        if not self.root.is_dir():
            return removed
        for entry in self.root.iterdir():
            tokened = TOKENED_TMP.match(entry.name)
            if tokened and (token is None or int(tokened.group(1)) >= token):
                continue  # another (newer) publisher's, or our own
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
                    self.remove(version)
                    removed.append(self.path(version))
        return removed

    def write(self, version: int, metadata: dict[str, Any], save: Callable[[Path], None], *,
              token: int | None = None) -> Path:
        """Write `version` as a complete `vNNNN` directory; return it.

        `save(directory)` writes the files; metadata.json (`metadata` with every file's checksum) is
        added, modes set (DIR_MODE, FILE_MODE), everything fsynced, and the directory renamed into
        place. It is staged in `.tmp-tNNNNNNNNNN-*` with the publisher's lease `token`. Raises
        VersionConflict when `vNNNN` exists already; on any error nothing of this call remains.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.path(version)
        prefix = TMP_PREFIX if token is None else f"{TMP_PREFIX}t{token:010d}-"
        staging = Path(tempfile.mkdtemp(prefix=prefix, dir=self.root))
        try:
            save(staging)
            _seal(staging, metadata)
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
        except BaseException:
            self.remove(version)
            raise
        return final

    def remove(self, version: int) -> None:
        """Delete `version`'s directory without any reader seeing half of it; returns nothing, logs failures."""
        _remove(self.path(version))


def _seal(directory: Path, metadata: dict[str, Any]) -> None:
    """Write metadata.json with the checksum of every other file in `directory`, and fsync them all."""
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.name != METADATA)
    missing = [name for name in WEIGHT_FILES if not (directory / name).is_file()]
    if missing:
        raise AdapterLoadError(f"saving the adapter wrote no {', '.join(missing)}")
    metadata = {**metadata, "files": {p.name: sha256_file(p) for p in files}}
    (directory / METADATA).write_text(json.dumps(metadata, indent=2, allow_nan=False), encoding="utf-8")
    for p in [*files, directory / METADATA]:
        os.chmod(p, FILE_MODE)
        _fsync_file(p)
    os.chmod(directory, DIR_MODE)  # mkdtemp made it 0700
    _fsync_dir(directory)


# ------------------------------------------------------------------------------ the lifecycle

class VersionLifecycle:
    """The adapter versions in the adapters directory and in the store's rows: publish, verify, apply, roll back."""

    def __init__(self, store, adapters: AdapterStore):
        self.store = store
        self.adapters = adapters

    def publish(self, policy: PolicyWithValueHead, record: VersionRecord, *, holder: str | None = None,
                token: int | None = None, write_extra: Callable[[Path], None] | None = None) -> int:
        """Write the policy's adapter as the next version, described by `record`, and publish it; return its number.

        `write_extra(directory)` may write more files (e.g. `trainer.save_state`). With `holder`,
        the store refuses unless that worker holds the lease (under fencing token `token`, which
        also names this publish's staging folder). If another publisher took the
        number, raises VersionConflict; if the store refuses the version (lease lost, parent rolled
        back, ...) its error is raised. Either way no `vNNNN` of this call remains.
        """
        self.adapters.clean_stale(self.store, token)
        version = self.adapters.next_version(self.store)
        metadata = version_metadata(version, record)  # fails before writing anything on NaN or non-JSON metrics

        def save(directory: Path) -> None:
            policy.save_adapter(directory)
            if write_extra is not None:
                write_extra(directory)

        final = self.adapters.write(version, metadata, save, token=token)
        try:
            self.store.publish_version(version, record, str(final.resolve()), holder=holder, token=token)
        except BaseException:
            self.adapters.remove(version)  # the store did not take it: leave no version directory behind
            raise
        log.info("published adapter version %d (parent %d) in %s", version, record.parent, final)
        return version

    def prune(self, keep: int) -> list[int]:
        """Remove the files of all but the newest `keep` versions on disk (0: keep all), the serving one and
        exported ones; return the versions pruned. Each is marked pruned in the store first (`mark_pruned`:
        it can no longer be rolled back to; its row and metrics stay), then its folder removed.
        """
        if keep <= 0:
            return []
        rows = {row.version: row for row in self.store.list_versions()}
        on_disk = [v for v in self.adapters.versions_on_disk() if v in rows]
        for version in on_disk:
            if rows[version].pruned_at is not None:  # marked, then a crash before its folder went
                self.adapters.remove(version)
        live = [v for v in on_disk if rows[v].pruned_at is None]
        pruned = [v for v in live[:-keep] if self.store.mark_pruned(v)]
        for version in pruned:
            self.adapters.remove(version)
        if pruned:
            log.info("pruned the files of versions %s (--keep-versions %d)", pruned, keep)
        return pruned

    def _pruned(self, version: int) -> bool:
        """Return whether the store records `version` as pruned (False for a version it does not know)."""
        return any(row.version == version and row.pruned_at is not None for row in self.store.list_versions())

    def verify(self, version: int, *, published: bool = False) -> dict[str, Any]:
        """Check that `version` can be loaded: the store has its adapter, its weight files match their checksums.

        Raises AdapterLoadError when the store records the version as failed (with `published`,
        as anything but published) or a file is missing or altered, StoreError when the store does
        not know it. Returns the version's metadata.
        """
        row = self.store.get_version(version)
        if published and row.status != "published":
            raise AdapterLoadError(f"version {version} is {row.status}, not published")
        if row.status == "failed":
            raise AdapterLoadError(f"version {version} failed in training; it has no adapter")
        return self.adapters.verify(version)

    def apply(self, policy: PolicyWithValueHead, version: int, *, initial: AdapterState | None = None,
              verify: bool = True) -> Path | None:
        """Load `version` into the policy in place (0 = the base model); return its directory (see `apply_version`)."""
        return apply_version(policy, self.adapters.root, version, initial=initial, verify=verify)

    def roll_back(self, policy: PolicyWithValueHead, version: int, *,
                  initial: AdapterState | None = None) -> list[int]:
        """Serve `version` again (0 = base): load it into the policy, then tell the store; return the versions rolled back.

        The store marks every newer published version rolled back. Raises AdapterLoadError when
        the version's files are missing, corrupt or do not fit, StoreError when the store refuses
        (not a published version); either way the policy's weights and the store are as before.
        """
        if version != BASE_VERSION and (not self.adapters.path(version).is_dir() or self._pruned(version)):
            if self._pruned(version):
                raise AdapterLoadError(f"version {version} was pruned (--keep-versions): its files are gone, so "
                                       "it cannot be served again")
            raise AdapterLoadError(f"{self.adapters.path(version)}: version {version} is not on disk")
        served = AdapterState.capture(policy)
        try:
            self.apply(policy, version, initial=initial)
            return self.store.rollback_to(version)
        except BaseException:
            served.restore()
            raise
