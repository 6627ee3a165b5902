"""What a published adapter version is on disk, and how a reader checks it (no torch: the page and export read it).

A version directory `vNNNN` holds the PEFT adapter (`adapter_config.json`, `adapter_model.safetensors`),
`value_head.safetensors` and `metadata.json`: the version's `VersionRecord` (base model, parent,
feedback cursor and counts, metrics) with its number, format, time, and the sha256 of every other
file. Safetensors and JSON only: nothing is ever unpickled. Writing lives in `adapters.py`.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from db.records import VersionRecord

ADAPTER_WEIGHTS = "adapter_model.safetensors"
VALUE_HEAD_WEIGHTS = "value_head.safetensors"
WEIGHT_FILES = (ADAPTER_WEIGHTS, VALUE_HEAD_WEIGHTS)  # what loading reads, so what loading verifies
METADATA = "metadata.json"
FORMAT = "ppo-feedback-adapter/1"


class AdapterLoadError(ValueError):
    """An adapter directory whose files are missing, unreadable or do not fit this model."""


def version_dir_name(version: int) -> str:
    """Return the directory name of a version: `v0001` (more digits past 9999)."""
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"adapter versions start at 1, not {version!r}")
    return f"v{version:04d}"


def version_dir(root: str | Path, version: int) -> Path:
    """Return the directory of `version` under the adapters directory `root` (it may not exist)."""
    return Path(root) / version_dir_name(version)


def version_metadata(version: int, record: VersionRecord) -> dict[str, Any]:
    """Return the metadata.json content of `record` published as `version`, without the file checksums.

    Raises ValueError or TypeError when the metrics are NaN, infinite or not JSON.
    """
    metadata = {
        "format": FORMAT, "version": version, "parent": record.parent, "base_model": record.base_model,
        "n_ratings": record.n_ratings, "n_preferences": record.n_preferences,
        "cursor": {"rating_id": record.cursor.rating_id, "preference_id": record.cursor.preference_id},
        "metrics": dict(record.metrics), "created_at": datetime.now(timezone.utc).isoformat(),
    }
    json.dumps(metadata, allow_nan=False)
    return metadata


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


def check_files(directory: Path, metadata: dict[str, Any], names: Iterable[str]) -> None:
    """Check the named files of a version directory against the checksums in its metadata; returns nothing.

    Raises AdapterLoadError naming the first file that is not listed, cannot be read or was altered.
    """
    files: dict[str, str] = metadata["files"]
    for name in names:
        if name not in files:
            raise AdapterLoadError(f"{directory}: {METADATA} lists no checksum for {name}")
        try:
            actual = sha256_file(directory / name)
        except OSError as exc:
            raise AdapterLoadError(f"{directory}: cannot read {name} ({exc})") from exc
        if actual != files[name]:
            raise AdapterLoadError(f"{directory}: {name} is corrupt (sha256 differs from the published one)")


def verify_directory(directory: Path, version: int | None = None, *, all_files: bool = False) -> dict[str, Any]:
    """Check a version directory against its metadata checksums; return the metadata.

    Checks the weight files loading reads (every listed file with `all_files`). Raises
    AdapterLoadError naming the first missing or altered file.
    """
    meta = read_metadata(directory, version)
    check_files(directory, meta, meta["files"] if all_files else WEIGHT_FILES)
    return meta
