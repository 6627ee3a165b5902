"""The page and its named API: rate candidates, watch the model learn, compare versions, operate.

`FeedbackApp` holds what the page does, as plain Python (who the rater is, limits, the JSON the
API returns); `build_demo` lays it out as Gradio Blocks and names the endpoints:

    /next_prompt   (rater="")                          -> {"prompt_id", "text"}
    /generate      (prompt, n, rater="")               -> [{"generation_id", "prompt_id", "text", "version"}]
    /rate          (generation_id, score, comment="", rater="") -> {"ok": true}
    /prefer        (chosen_id, rejected_ids, rater="") -> {"ok": true}
    /status        ()                                  -> serving/latest version, worker, counts, versions
    /export_adapter (version)      admin               -> the version's adapter as a zip file
    /export_ratings (fmt)          admin               -> the ratings as JSONL (preference|unpaired|ratings)
    /rollback       (version)      admin               -> {"ok": true, "rolled_back": [...], "serving_version"}

With a users file the logged-in name is the rater (a `rater` argument is ignored) and only admins
may call the admin endpoints; without one every action is by the local user, who is the admin.

Model text, prompts and comments are only ever shown in text boxes, never as HTML or Markdown.
"""
from __future__ import annotations

import functools
import html
import inspect
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from db.export import FORMATS, export_jsonl
from db.records import BASE_VERSION
from .auth import UserDirectory
from .config import SamplingConfig
from .policy import AdapterLoadError

log = logging.getLogger(__name__)

LOCAL_USER = "local"
"""The rater (and admin) every action is attributed to when the page runs without a users file."""
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
SCORES = [1, 2, 3, 4, 5]
STATUS_REFRESH_S = 2.0
STREAM_AFTER_S = 0.75
"""When one candidate takes longer than this, the rest are generated and shown one at a time."""
REWARD_METRIC = "objective/scores"
KL_METRIC = "objective/kl"
VERSION_COLUMNS = ["version", "status", "parent", "mean rating", "ratings"]
BUILTIN_PROMPTS = Path(__file__).with_name("prompts.txt")


class Forbidden(PermissionError):
    """An admin-only action asked for by someone who is not an admin."""


def builtin_prompts() -> list[str]:
    """Return the prompts shipped with the app (`ppo_feedback/prompts.txt`, one per line)."""
    return [line.rstrip() for line in BUILTIN_PROMPTS.read_text(encoding="utf-8").splitlines() if line.strip()]


def parse_prompt_upload(text: str, filename: str = "") -> list[str]:
    """Return the prompts of an upload: JSONL with a "prompt" field (a .jsonl/.json file, or text whose
    first line is a JSON object), otherwise one prompt per non-blank line. Raises ValueError naming
    the offending line."""
    lines = text.splitlines()
    first = next((line.strip() for line in lines if line.strip()), "")
    if not first:
        raise ValueError("The upload holds no prompts.")
    as_jsonl = filename.lower().endswith((".jsonl", ".json")) or first.startswith("{")
    prompts: list[str] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if not as_jsonl:
            prompts.append(line.rstrip())
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise ValueError(f"Line {number} is not valid JSON ({exc.msg}).") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise ValueError(f'Line {number} has no text field "prompt".')
        prompts.append(row["prompt"])
    return prompts


def version_label(version: int) -> str:
    """Return how the page names a version: "base model" for 0, else "v3"."""
    return "base model" if version == BASE_VERSION else f"v{version}"


def _safe_message(message: str) -> str:
    """Return a message for Gradio's toasts, which render HTML: &, < and > escaped."""
    return html.escape(message, quote=False)


def _as_int(value: Any, what: str) -> int:
    """Return an integral number as int (JSON clients may send 3.0); raise ValueError otherwise."""
    if isinstance(value, bool) or value is None:
        raise ValueError(f"The {what} must be an integer, not {value!r}.")
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"The {what} must be an integer, not {value!r}.")
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
        return int(value)
    raise ValueError(f"The {what} must be an integer, not {value!r}.")


def shown_errors(fn: Callable) -> Callable:
    """Turn bad-input exceptions into gr.Error: ValueError (StoreError, PromptError, AdapterLoadError,
    ExportError, limits) and PermissionError (Forbidden). Anything else stays a server error."""
    def convert(exc: Exception) -> gr.Error:
        return gr.Error(_safe_message(str(exc)), print_exception=False)

    if _is_generator(fn):
        @functools.wraps(fn)
        def generator(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except gr.Error:
                raise
            except (ValueError, PermissionError) as exc:
                raise convert(exc) from exc
        return generator

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except (ValueError, PermissionError) as exc:
            raise convert(exc) from exc
    return wrapper


def _is_generator(fn: Callable) -> bool:
    return inspect.isgeneratorfunction(fn)


# ------------------------------------------------------------------------------------ the logic

@dataclass
class _MetricCache:
    """Reward score and KL points seen so far; metrics are append-only, so only new ids are read."""

    last_id: int = 0
    steps: dict[tuple[int, int], int] = field(default_factory=dict)  # (version, iteration) -> step
    rows: list[dict[str, Any]] = field(default_factory=list)


class FeedbackApp:
    """What the page does, independent of the layout: identities, limits, store and model calls."""

    def __init__(self, serving, store, sampling: SamplingConfig, *, users: UserDirectory | None = None,
                 adapters_dir: str | os.PathLike[str] | None = None, worker_note: str | None = None,
                 model_cache_dir: str | None = None, title: str = "ppo-feedback"):
        self.serving = serving
        self.store = store
        self.sampling = sampling
        self.users = users
        self.adapters_dir = Path(adapters_dir) if adapters_dir is not None else Path(serving.adapters.root)
        self.worker_note = worker_note
        self.model_cache_dir = model_cache_dir
        self.title = title
        self._export_dir = Path(tempfile.mkdtemp(prefix="ppo-feedback-exports-"))
        self._export_lock = threading.Lock()
        self._metrics = _MetricCache()
        self._metrics_lock = threading.Lock()
        self._status_cache: tuple[float, dict[str, Any]] | None = None
        self._status_lock = threading.Lock()

    def close(self) -> None:
        """Remove the temporary export files; returns nothing."""
        shutil.rmtree(self._export_dir, ignore_errors=True)

    # ------------------------------------------------------------------------- identities

    @property
    def auth_enabled(self) -> bool:
        return self.users is not None

    def rater(self, request: gr.Request | None, requested: str | None = "") -> str:
        """Return who acts: the logged-in user under auth (ignoring `requested`), else `requested` or the local user."""
        if self.users is not None:
            name = getattr(request, "username", None)
            if not name:
                raise Forbidden("Log in first.")
            return name
        requested = (requested or "").strip() if isinstance(requested, str) else ""
        return requested or LOCAL_USER

    def is_admin(self, request: gr.Request | None) -> bool:
        """Return whether the request may operate (every request when auth is off)."""
        if self.users is None:
            return True
        return self.users.is_admin(getattr(request, "username", None))

    def require_admin(self, request: gr.Request | None, action: str) -> None:
        """Raise Forbidden unless the request comes from an admin."""
        if not self.is_admin(request):
            raise Forbidden(f"Only admins can {action}.")

    # ---------------------------------------------------------------------------- rating

    def check_prompt(self, prompt: Any) -> str:
        """Return the prompt if it is non-blank text within the length limit; raise ValueError with the reason."""
        if not isinstance(prompt, str):
            raise ValueError("The prompt must be text.")
        if not prompt.strip():
            raise ValueError("The prompt is empty.")
        if len(prompt) > self.sampling.max_prompt_chars:
            raise ValueError(f"The prompt has {len(prompt)} characters; the limit is "
                             f"{self.sampling.max_prompt_chars}.")
        return prompt

    def check_n(self, n: Any) -> int:
        """Return the number of candidates asked for if it is within 1..max_candidates; raise ValueError otherwise."""
        n = _as_int(n, "number of candidates")
        if not 1 <= n <= self.sampling.max_candidates:
            raise ValueError(f"Ask for 1 to {self.sampling.max_candidates} candidates, not {n}.")
        return n

    def next_prompt(self, rater: str) -> dict[str, Any]:
        """Return {"prompt_id", "text"} of the least-rated pool prompt this rater has not rated (both None when none is left)."""
        prompt = self.store.next_prompt(rater)
        if prompt is None:
            return {"prompt_id": None, "text": None}
        return {"prompt_id": prompt.id, "text": prompt.text}

    def generate(self, prompt: str, n: int, rater: str, seed: int | None = None) -> list[dict[str, Any]]:
        """Sample and record n candidates with the serving version; return their API records."""
        prompt = self.check_prompt(prompt)
        n = self.check_n(n)
        generations = self.serving.generate(prompt, n, rater=rater, seed=seed)
        return [{"generation_id": g.id, "prompt_id": g.prompt_id, "text": g.text, "version": g.adapter_version}
                for g in generations]

    def rate(self, generation_id: Any, score: Any, comment: str | None, rater: str) -> dict[str, Any]:
        """Store one rating (1..5, optional comment); return {"ok": True}."""
        self.store.rate(generation_id, rater, score, comment or None)
        return {"ok": True}

    def prefer(self, chosen_id: Any, rejected_ids: Any, rater: str) -> dict[str, Any]:
        """Store "chosen is better than each rejected one"; return {"ok": True}."""
        if not isinstance(rejected_ids, (list, tuple)):
            raise ValueError("rejected_ids must be a list of generation ids.")
        self.store.pick_best(chosen_id, list(rejected_ids), rater)
        return {"ok": True}

    def submit(self, generation_ids: list[int], scores: list[Any], best: int | None, comment: str,
               rater: str) -> str:
        """Store a rater's whole judgement of one set of candidates; return the confirmation to show.

        `scores[i]` rates `generation_ids[i]` (None: not rated); `best` is the index of the best
        candidate (stored as preferred over every other shown one). The comment goes with each rating.
        Everything is checked before anything is written.
        """
        if not generation_ids:
            raise ValueError("Generate candidates first.")
        rated = [(gid, _as_int(s, "score")) for gid, s in zip(generation_ids, scores) if s not in (None, "")]
        for _, score in rated:
            if not 1 <= score <= 5:
                raise ValueError(f"Scores go from 1 to 5, not {score}.")
        if best is not None and not 0 <= best < len(generation_ids):
            raise ValueError(f"Candidate {LETTERS[best] if 0 <= best < len(LETTERS) else best} "
                             "is not there (yet).")
        if best is not None and len(generation_ids) < 2:
            raise ValueError("Picking the best one needs at least two candidates.")
        if not rated and best is None:
            raise ValueError("Rate at least one candidate (1–5) or pick the best one.")
        if comment and comment.strip() and not rated:
            raise ValueError("A comment is stored with the ratings: rate at least one candidate.")
        for gid, score in rated:
            self.store.rate(gid, rater, score, comment or None)
        parts = [f"{len(rated)} rating{'s' if len(rated) != 1 else ''}"]
        if best is not None:
            rejected = [gid for i, gid in enumerate(generation_ids) if i != best]
            self.store.pick_best(generation_ids[best], rejected, rater)
            parts.append(f"{LETTERS[best]} as the best")
        return "Saved " + " and ".join(parts) + "."

    # ---------------------------------------------------------------------------- status

    def worker_state(self, status) -> str:
        """Return the worker line of the status panel."""
        if status.present:
            return status.state
        return f"paused: {self.worker_note}" if self.worker_note else "paused: no worker holds the training lease"

    def status(self, max_age_s: float = 1.0) -> dict[str, Any]:
        """Return the /status record (cached for `max_age_s` so that many open pages cost one query set)."""
        with self._status_lock:
            now = time.monotonic()
            if self._status_cache is not None and now - self._status_cache[0] < max_age_s:
                return self._status_cache[1]
            serving_version = self.serving.version  # read once: a swap may land while the record is built
            counts = self.store.counts(since_version=serving_version)
            worker = self.store.worker_status()
            versions = self.store.list_versions()
            summary = self.store.version_rating_summary()
            latest = versions[-1] if versions else None
            record = {
                "serving_version": serving_version,
                "latest_version": latest.version if latest else BASE_VERSION,
                "latest_status": latest.status if latest else None,
                "worker": {"state": self.worker_state(worker), "present": worker.present, "holder": worker.holder},
                "counts": {key: counts[key] for key in ("prompts", "generations", "ratings", "preferences", "raters",
                                                        "ratings_since_serving", "preferences_since_serving")},
                "versions": [{"version": s.version, "mean_rating": round(s.mean_rating, 4), "n_ratings": s.n_ratings}
                             for s in summary],
                "swap_error": self.serving.last_swap_error,
                "adapter_versions": [{"version": v.version, "status": v.status, "parent": v.parent}
                                     for v in versions],
            }
            self._status_cache = (now, record)
            return record

    def metric_rows(self) -> list[dict[str, Any]]:
        """Return every reward-score and KL point as {"step", "version", "iteration", "metric", "value"}, in order.

        `step` counts PPO iterations across all versions (1, 2, ...), in the order they were recorded.
        """
        with self._metrics_lock:
            cache = self._metrics
            for point in self.store.metrics(since_id=cache.last_id):
                cache.last_id = point.id
                if point.name not in (REWARD_METRIC, KL_METRIC):
                    continue
                key = (point.version, point.iteration)
                step = cache.steps.setdefault(key, len(cache.steps) + 1)
                cache.rows.append({"step": step, "version": point.version, "iteration": point.iteration,
                                   "metric": point.name, "value": point.value})
            return list(cache.rows)

    def plots(self) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
        """Return the data of the three plots: mean human rating per version, reward score and KL per iteration."""
        versions = self.status()["versions"]
        # Categories sort as text in the plot (a `sort` list goes stale in the browser when versions are added):
        # "base model" < "v01" < ... < "v10" once there are ten versions.
        width = len(str(max((v["version"] for v in versions), default=0)))
        ratings = pd.DataFrame(
            [{"version": "base model" if v["version"] == BASE_VERSION else f"v{v['version']:0{width}d}",
              "mean rating": v["mean_rating"], "ratings": v["n_ratings"]} for v in versions],
            columns=["version", "mean rating", "ratings"])
        rows = pd.DataFrame(self.metric_rows(), columns=["step", "version", "iteration", "metric", "value"])
        score = rows[rows.metric == REWARD_METRIC].rename(columns={"value": "reward score", "step": "PPO iteration"})
        kl = rows[rows.metric == KL_METRIC].rename(columns={"value": "KL", "step": "PPO iteration"})
        return ratings, score.drop(columns="metric"), kl.drop(columns="metric")

    # --------------------------------------------------------------------------- compare

    def compare(self, prompt: str, version: int | None, seed: int) -> dict[str, Any]:
        """Sample one completion from the base model, the serving version and `version` with the same seed."""
        prompt = self.check_prompt(prompt)
        seed = _as_int(seed, "seed")
        serving = self.serving.version

        def one(v: int) -> str:
            return self.serving.generate_with_version(prompt, v, seed)[0].text

        result = {"seed": seed, "base": one(BASE_VERSION), "serving": {"version": serving, "text": one(serving)}}
        if version is not None:
            version = _as_int(version, "version")
            result["chosen"] = {"version": version, "text": one(version)}
        return result

    # --------------------------------------------------------------------------- operate

    def add_prompts(self, text: str, filename: str = "") -> str:
        """Add uploaded prompts to the pool (source "uploaded"); return what happened."""
        prompts = parse_prompt_upload(text, filename)
        before = {p.id for p in self.store.list_prompts(active_only=False)}
        ids = self.store.add_prompts(prompts, source="uploaded")
        new = len(set(ids) - before)
        return f"Added {new} new prompt{'s' if new != 1 else ''}; {len(set(ids)) - new} were already in the pool."

    def rollback(self, version: Any) -> dict[str, Any]:
        """Serve an earlier version (0 = base model) from now on; return {"ok", "rolled_back", "serving_version"}."""
        version = _as_int(version, "version")
        rolled_back = self.serving.rollback(version)
        with self._status_lock:
            self._status_cache = None
        return {"ok": True, "rolled_back": rolled_back, "serving_version": self.serving.version}

    def export_adapter(self, version: Any) -> str:
        """Zip a version as a standard PEFT adapter folder (with a model card); return the zip's path.

        Uses `ppo_feedback.export` (checksums checked, internal files left out); without it, zips the
        version directory as published, after checking every file against its checksum.
        """
        version = _as_int(version, "version")
        if version == BASE_VERSION:
            raise ValueError("Version 0 is the base model; it has no adapter to download.")
        try:
            from .export import export_zip
        except ImportError:
            export_zip = None
        with self._export_lock:
            if export_zip is not None:
                return str(export_zip(version, self._export_dir, store=self.store, adapters_dir=self.adapters_dir,
                                      cache_dir=self.model_cache_dir, overwrite=True))
            return self._zip_version_dir(version)

    def _zip_version_dir(self, version: int) -> str:
        from .adapters import AdapterStore, version_dir_name

        row = self.store.get_version(version)
        if row.status == "failed":
            raise ValueError(f"Version {version} failed in training; it has no adapter.")
        adapters = AdapterStore(self.adapters_dir)
        directory = adapters.path(version)
        if not directory.is_dir():
            raise AdapterLoadError(f"Version {version} is not in the adapters directory.")
        adapters.verify(version, all_files=True)
        name = f"ppo-feedback-{version_dir_name(version)}"
        target = self._export_dir / f"{name}.zip"
        partial = target.with_suffix(".zip.partial")
        with zipfile.ZipFile(partial, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for path in sorted(directory.rglob("*")):
                if path.is_file():
                    archive.write(path, f"{name}/{path.relative_to(directory).as_posix()}")
        os.replace(partial, target)
        return str(target)

    def export_ratings(self, fmt: str) -> str:
        """Write the ratings export in one of db.export's formats; return the JSONL file's path."""
        if fmt not in FORMATS:
            raise ValueError(f"Unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}.")
        with self._export_lock:
            target = self._export_dir / f"feedback-{fmt}.jsonl"
            partial = target.with_suffix(".jsonl.partial")
            export_jsonl(self.store, fmt, partial)
            os.replace(partial, target)
        return str(target)


# --------------------------------------------------------------------------------- the page

KEYBOARD_HEAD = """
<style>
  .candidate.kbd-current { outline: 2px solid var(--color-accent); outline-offset: 2px; border-radius: 8px; }
  #kbd-help { opacity: 0.8; }
</style>
<script>
/* ppo-feedback keyboard: 1-5 rates the focused (or last clicked) candidate and moves to the next one,
   b marks it as the best, Enter submits (Ctrl+Enter also from inside a text box). */
(() => {
  const editable = (el) => !!el && (el.isContentEditable ||
      ((el.tagName === "TEXTAREA" || (el.tagName === "INPUT" && !["radio", "checkbox", "button", "submit"].includes(el.type)))
       && !el.readOnly && !el.disabled));
  const visible = (el) => !!el && el.offsetParent !== null;
  const candidates = () => Array.from(document.querySelectorAll(".candidate")).filter(visible);
  let current = null;
  const mark = (card) => {
    document.querySelectorAll(".candidate.kbd-current").forEach((c) => c.classList.remove("kbd-current"));
    current = card;
    if (card) card.classList.add("kbd-current");
  };
  const pick = (container, text) => {
    if (!container) return false;
    for (const label of container.querySelectorAll("label")) {
      const input = label.querySelector("input[type=radio]");
      if (input && label.textContent.trim() === text) { input.click(); return true; }
    }
    return false;
  };
  const focusCard = (card) => {
    if (!card) return;
    card.focus();
    mark(card);
  };
  /* Read-only text boxes are disabled textareas, which cannot take focus: the cards themselves can. */
  const focusable = () => document.querySelectorAll(".candidate:not([tabindex])").forEach((c) => { c.tabIndex = 0; });
  new MutationObserver(focusable).observe(document.documentElement, {childList: true, subtree: true});
  window.ppoFeedbackFocusCandidate = (index) => focusCard(document.querySelector("#candidate-" + index));
  const submit = () => {
    const button = document.querySelector("#submit-ratings");
    if (visible(button) && !button.disabled) { button.click(); return true; }
    return false;
  };
  const track = (event) => {
    const card = event.target.closest && event.target.closest(".candidate");
    if (card) mark(card);
  };
  document.addEventListener("focusin", track, true);
  document.addEventListener("pointerdown", track, true);
  document.addEventListener("keydown", (event) => {
    const target = event.target;
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      if (submit()) event.preventDefault();
      return;
    }
    if (event.ctrlKey || event.metaKey || event.altKey || editable(target)) return;
    const card = (target.closest && target.closest(".candidate")) || (visible(current) ? current : null);
    if (/^[1-5]$/.test(event.key)) {
      if (!card) return;
      if (pick(card.querySelector(".rating"), event.key)) {
        event.preventDefault();
        const list = candidates();
        const next = list[list.indexOf(card) + 1];
        if (next) focusCard(next); else mark(card);
      }
    } else if (event.key === "b" || event.key === "B") {
      if (!card) return;
      const index = /^candidate-(\\d+)$/.exec(card.id);
      const letter = index ? "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[Number(index[1])] : null;
      if (letter && pick(document.querySelector("#best-candidate"), letter)) event.preventDefault();
    } else if (event.key === "Enter") {
      if (target.tagName === "BUTTON" || target.tagName === "A") return;
      if (card || candidates().length) { if (submit()) event.preventDefault(); }
    }
  }, true);
})();
</script>
"""

KEYBOARD_HELP = ("Keyboard: click or Tab to a candidate, then 1–5 rates it and moves to the next one; "
                 "b marks it as the best; Enter submits (Ctrl+Enter from inside a text box).")


def _md_escape(text: str) -> str:
    """Return text that Markdown shows literally (for names the operator chose)."""
    return re.sub(r"([\\`*_{}\[\]()#+\-.!|<>&])", r"\\\1", text)


def build_demo(app: FeedbackApp) -> gr.Blocks:
    """Return the page: Rate, Progress, Compare and (for admins) Operate, with the named API endpoints."""
    max_n = app.sampling.max_candidates
    letters = LETTERS[:max_n]

    with gr.Blocks(title=app.title) as demo:
        gr.Markdown(f"# ppo-feedback\nRate the model's answers; a worker trains it on your ratings with PPO and "
                    f"the page switches to each new version by itself. Model: {_md_escape(app.serving.base_model)}.")
        with gr.Row():
            who = gr.Markdown("", elem_id="who")
            if app.auth_enabled:
                gr.Button("Log out", link="/logout", size="sm", scale=0, min_width=100)
        with gr.Row(elem_id="status-panel"):
            serving_box = gr.Textbox(label="Serving version", interactive=False, elem_id="status-serving")
            newest_box = gr.Textbox(label="Newest version", interactive=False, elem_id="status-newest")
            worker_box = gr.Textbox(label="Worker", interactive=False, elem_id="status-worker", scale=2)
            ratings_box = gr.Textbox(label="Ratings (total / since the serving version)", interactive=False,
                                     elem_id="status-ratings")
        banner = gr.Textbox(label="Notice", interactive=False, visible=False, elem_id="banner")
        seen_version = gr.State(None)
        fingerprint_seen = gr.State(None)

        # ------------------------------------------------------------------------- Rate
        with gr.Tab("Rate", id="rate"):
            with gr.Row():
                prompt = gr.Textbox(label="Prompt", lines=3, max_lines=10, scale=4, elem_id="prompt",
                                    placeholder="Press 'Next prompt' or type your own.")
                with gr.Column(scale=1, min_width=180):
                    next_button = gr.Button("Next prompt", elem_id="next-prompt")
                    n_slider = gr.Slider(1, max_n, value=app.sampling.num_candidates, step=1, label="Candidates",
                                         elem_id="n-candidates")
                    generate_button = gr.Button("Generate", variant="primary", elem_id="generate")
            message = gr.Textbox(show_label=False, interactive=False, container=False, elem_id="rate-message",
                                 placeholder="")
            generation_ids = gr.State([])
            columns, texts, radios = [], [], []
            with gr.Row(equal_height=True):
                for i, letter in enumerate(letters):
                    with gr.Column(visible=False, min_width=220, elem_classes=["candidate"],
                                   elem_id=f"candidate-{i}") as column:
                        texts.append(gr.Textbox(label=f"{letter}", lines=6, max_lines=14, interactive=False,
                                                elem_id=f"candidate-text-{i}"))
                        radios.append(gr.Radio(SCORES, label=f"Rating of {letter}", elem_classes=["rating"],
                                               elem_id=f"rating-{i}"))
                    columns.append(column)
            best = gr.Radio(choices=[], label="Best candidate (optional)", elem_id="best-candidate")
            comment = gr.Textbox(label="Comment (optional)", lines=2, elem_id="comment")
            submit_button = gr.Button("Submit ratings", variant="primary", elem_id="submit-ratings")
            gr.Markdown(KEYBOARD_HELP, elem_id="kbd-help")

        # --------------------------------------------------------------------- Progress
        with gr.Tab("Progress", id="progress"):
            gr.Markdown("Mean human rating of each version's generations is the real measure: did people like "
                        "the newer versions more? Version 0 is the base model.")
            rating_plot = gr.LinePlot(x="version", y="mean rating", title="Mean human rating per version",
                                      y_lim=[1, 5], tooltip=["version", "mean rating", "ratings"],
                                      elem_id="plot-ratings")
            with gr.Row():
                score_plot = gr.LinePlot(x="PPO iteration", y="reward score", title="Reward-model score per PPO iteration",
                                         tooltip=["PPO iteration", "version", "iteration", "reward score"],
                                         elem_id="plot-score")
                kl_plot = gr.LinePlot(x="PPO iteration", y="KL", title="KL to the base model per PPO iteration",
                                      tooltip=["PPO iteration", "version", "iteration", "KL"], elem_id="plot-kl")
            progress_table = gr.Dataframe(headers=VERSION_COLUMNS, interactive=False, label="Versions",
                                          elem_id="progress-versions")

        # ---------------------------------------------------------------------- Compare
        with gr.Tab("Compare", id="compare"):
            gr.Markdown("The same prompt and seed through the base model (adapter off), the serving version and "
                        "a version you choose. Nothing here is recorded.")
            with gr.Row():
                compare_prompt = gr.Textbox(label="Prompt", lines=2, scale=4, elem_id="compare-prompt")
                with gr.Column(scale=1, min_width=180):
                    compare_version = gr.Dropdown(choices=[], label="Version", elem_id="compare-version")
                    compare_seed = gr.Number(value=0, precision=0, label="Seed", elem_id="compare-seed")
                    compare_button = gr.Button("Compare", variant="primary", elem_id="compare-button")
            with gr.Row():
                compare_base = gr.Textbox(label="Base model (v0)", lines=6, interactive=False)
                compare_serving = gr.Textbox(label="Serving version", lines=6, interactive=False)
                compare_chosen = gr.Textbox(label="Chosen version", lines=6, interactive=False)

        # ---------------------------------------------------------------------- Operate
        with gr.Tab("Operate", id="operate", visible=False) as operate_tab:
            operate_table = gr.Dataframe(headers=VERSION_COLUMNS, interactive=False, label="Versions")
            with gr.Row():
                with gr.Column():
                    gr.Markdown("**Add prompts**: a text file with one prompt per line, or JSONL with a "
                                "`prompt` field.")
                    upload = gr.File(label="Prompts file", file_types=[".txt", ".jsonl", ".json"], type="filepath",
                                     height=120)
                    pasted = gr.Textbox(label="…or paste prompts", lines=4, elem_id="operate-paste")
                    add_button = gr.Button("Add prompts")
                    add_message = gr.Textbox(show_label=False, interactive=False, container=False)
                with gr.Column():
                    gr.Markdown("**Versions**: roll back to an earlier one (0 = base model), or download one's "
                                "adapter as a zip (a standard PEFT folder).")
                    op_version = gr.Number(value=0, precision=0, label="Version", elem_id="operate-version")
                    with gr.Row():
                        rollback_button = gr.Button("Roll back to this version")
                        adapter_button = gr.Button("Download adapter zip")
                    op_message = gr.Textbox(show_label=False, interactive=False, container=False)
                    adapter_file = gr.File(label="Adapter", interactive=False, height=90)
                with gr.Column():
                    gr.Markdown("**Ratings export** (JSONL): `preference` (prompt/chosen/rejected), "
                                "`unpaired` (prompt/completion/label), `ratings` (everything).")
                    export_format = gr.Radio(list(FORMATS), value="preference", label="Format")
                    export_button = gr.Button("Export ratings")
                    export_file = gr.File(label="Export", interactive=False, height=90)

        timer = gr.Timer(STATUS_REFRESH_S)

        # =============================================================== handlers (page)

        def status_outputs(record: dict[str, Any]) -> tuple:
            counts = record["counts"]
            latest = record["latest_version"]
            newest = "none yet" if latest == BASE_VERSION else (
                f"v{latest}" + ("" if record["latest_status"] == "published" else f" ({record['latest_status']})"))
            return (version_label(record["serving_version"]), newest, record["worker"]["state"],
                    f"{counts['ratings']} / {counts['ratings_since_serving']}")

        status_boxes = [serving_box, newest_box, worker_box, ratings_box]

        def version_choices(record: dict[str, Any]) -> list[tuple[str, int]]:
            choices = [("0 (base model)", 0)]
            choices += [(f"{v['version']} ({v['status'].replace('_', ' ')})", v["version"])
                        for v in record["adapter_versions"] if v["status"] != "failed"]
            return choices

        def versions_rows(record: dict[str, Any]) -> list[list[Any]]:
            means = {v["version"]: v for v in record["versions"]}
            rows = [(BASE_VERSION, "base model", "")]
            rows += [(v["version"], v["status"].replace("_", " "), v["parent"]) for v in record["adapter_versions"]]
            return [[version, status, parent,
                     means[version]["mean_rating"] if version in means else "",
                     means[version]["n_ratings"] if version in means else 0]
                    for version, status, parent in rows]

        def plot_values() -> tuple:
            return app.plots()

        tables = [progress_table, operate_table]
        plots = [rating_plot, score_plot, kl_plot]

        @shown_errors
        def on_load(request: gr.Request):
            record = app.status(max_age_s=0)
            admin = app.is_admin(request)
            if app.auth_enabled:
                name = app.rater(request)
                who_text = f"Signed in as **{_md_escape(name)}**" + (" (admin)" if admin else "")
            else:
                who_text = "Running without logins: you rate as the local user."
                name = LOCAL_USER
            pool = app.next_prompt(name)
            rows = versions_rows(record)
            return (who_text, gr.Tab(visible=admin), pool["text"] or "", *status_outputs(record),
                    gr.Dropdown(choices=version_choices(record), value=None), rows, rows,
                    record["serving_version"], None, *plot_values())

        demo.load(on_load, None, [who, operate_tab, prompt, *status_boxes, compare_version, *tables,
                                  seen_version, fingerprint_seen, *plots], api_visibility="private")

        def on_tick(last_version, last_fingerprint):
            try:
                record = app.status()
            except Exception as exc:  # noqa: BLE001 - a database hiccup must not break the page
                log.warning("status refresh failed: %s", exc)
                return (*[gr.skip()] * 4, gr.Textbox(value=f"Status unavailable: {exc}", visible=True),
                        *[gr.skip()] * 8)
            serving = record["serving_version"]
            if last_version is not None and serving != last_version:
                what = "Rolled back: now serving" if serving < last_version else "New version: now serving"
                gr.Info(f"{what} {version_label(serving)}.", duration=8, title="Model updated")
            error = record["swap_error"]
            banner_update = gr.Textbox(value=error or "", visible=bool(error))
            versions_now = tuple((v["version"], v["status"]) for v in record["adapter_versions"])
            fingerprint = [versions_now, serving, record["counts"]["ratings"], len(app.metric_rows())]
            if fingerprint == last_fingerprint:
                refreshed = [gr.skip()] * 6
            else:
                same_versions = last_fingerprint is not None and last_fingerprint[0] == versions_now
                rows = versions_rows(record)
                refreshed = [*plot_values(), gr.skip() if same_versions else gr.Dropdown(choices=version_choices(record)),
                             rows, rows]
            return (*status_outputs(record), banner_update, serving, fingerprint, *refreshed)

        timer.tick(on_tick, [seen_version, fingerprint_seen],
                   [*status_boxes, banner, seen_version, fingerprint_seen, *plots, compare_version, *tables],
                   api_visibility="private", concurrency_limit=None, show_progress="hidden")

        def empty_cards():
            return ([], *[gr.Column(visible=False) for _ in letters], *[gr.Textbox(value="") for _ in letters],
                    *[gr.Radio(value=None) for _ in letters], gr.Radio(choices=[], value=None))

        card_outputs = [generation_ids, *columns, *texts, *radios, best]

        @shown_errors
        def on_next(request: gr.Request):
            pool = app.next_prompt(app.rater(request))
            text = pool["text"]
            note = "" if text is not None else "You have rated every prompt in the pool; type your own."
            return (gr.skip() if text is None else text, note, *empty_cards())

        next_button.click(on_next, None, [prompt, message, *card_outputs], api_visibility="private")

        @shown_errors
        def on_generate(prompt_text: str, n: float, request: gr.Request) -> Iterator[tuple]:
            rater = app.rater(request)
            prompt_text = app.check_prompt(prompt_text)
            n = app.check_n(n)
            cards: list[dict[str, Any]] = []

            def update(note: str, first: bool = False) -> tuple:
                column_updates = [gr.Column(visible=i < n) for i in range(max_n)] if first else [gr.skip()] * max_n
                text_updates = []
                for i in range(max_n):
                    if i < len(cards):
                        c = cards[i]
                        text_updates.append(gr.Textbox(value=c["text"],
                                                       label=f"{letters[i]} · {version_label(c['version'])}"))
                    elif i < n:
                        text_updates.append(gr.Textbox(value="", label=f"{letters[i]} · generating…"))
                    else:
                        text_updates.append(gr.skip() if not first else gr.Textbox(value=""))
                radio_updates = [gr.Radio(value=None) for _ in range(max_n)] if first else [gr.skip()] * max_n
                best_update = gr.Radio(choices=list(letters[:n]), value=None) if first else gr.skip()
                return (note, [c["generation_id"] for c in cards], *column_updates, *text_updates, *radio_updates,
                        best_update)

            yield update(f"Generating {n} candidate{'s' if n != 1 else ''}…", first=True)
            started = time.perf_counter()
            cards += app.generate(prompt_text, 1, rater)
            one_by_one = time.perf_counter() - started > STREAM_AFTER_S
            while len(cards) < n:
                if one_by_one:
                    yield update(f"Generated {len(cards)} of {n}…")
                cards += app.generate(prompt_text, 1 if one_by_one else n - len(cards), rater)
            versions = sorted({c["version"] for c in cards})
            yield update(f"{n} candidate{'s' if n != 1 else ''} from {', '.join(map(version_label, versions))}: "
                         "rate each 1–5, pick the best if you like, then submit.")

        generate_event = generate_button.click(
            on_generate, [prompt, n_slider], [message, *card_outputs], api_visibility="private",
            concurrency_id="model", concurrency_limit=1)
        generate_event.then(None, None, None, js="() => { if (window.ppoFeedbackFocusCandidate) "
                                                  "window.ppoFeedbackFocusCandidate(0); }")

        @shown_errors
        def on_submit(values: dict, request: gr.Request):
            rater = app.rater(request)
            ids = values[generation_ids]
            scores = [values[r] for r in radios[:len(ids)]]
            best_letter = values[best]
            best_index = letters.index(best_letter) if best_letter else None
            confirmation = app.submit(ids, scores, best_index, values[comment], rater)
            gr.Info(confirmation, duration=4, title="Thank you")
            pool = app.next_prompt(rater)
            with app._status_lock:
                app._status_cache = None
            record = app.status()
            offer = (" Next prompt loaded: press Generate." if pool["text"] is not None
                     else " You have rated every prompt in the pool; type your own.")
            return (confirmation + offer, pool["text"] if pool["text"] is not None else "", gr.Textbox(value=""),
                    *status_outputs(record), *empty_cards())

        submit_button.click(on_submit, {generation_ids, best, comment, *radios},
                            [message, prompt, comment, *status_boxes, *card_outputs], api_visibility="private")

        @shown_errors
        def on_compare(prompt_text: str, version: Any, seed: Any):
            result = app.compare(prompt_text, version, seed if seed is not None else 0)
            chosen = result.get("chosen")
            return (gr.Textbox(value=result["base"]),
                    gr.Textbox(value=result["serving"]["text"],
                               label=f"Serving version ({version_label(result['serving']['version'])})"),
                    gr.Textbox(value=chosen["text"] if chosen else "",
                               label=f"Chosen version ({version_label(chosen['version'])})" if chosen
                               else "Chosen version (pick one above)"))

        compare_button.click(on_compare, [compare_prompt, compare_version, compare_seed],
                             [compare_base, compare_serving, compare_chosen], api_visibility="private",
                             concurrency_id="model", concurrency_limit=1)

        @shown_errors
        def on_add_prompts(path: str | None, text: str, request: gr.Request):
            app.require_admin(request, "add prompts")
            parts = []
            if path:
                parts.append(app.add_prompts(Path(path).read_text(encoding="utf-8"), os.path.basename(path)))
            if text and text.strip():
                parts.append(app.add_prompts(text))
            if not parts:
                raise ValueError("Choose a file or paste prompts first.")
            return " ".join(parts), None, ""

        add_button.click(on_add_prompts, [upload, pasted], [add_message, upload, pasted], api_visibility="private")

        @shown_errors
        def on_rollback(version: Any, request: gr.Request):
            app.require_admin(request, "roll back")
            result = app.rollback(version)
            rolled = ", ".join(f"v{v}" for v in result["rolled_back"]) or "nothing"
            return f"Rolled back {rolled}; serving {version_label(result['serving_version'])}."

        rollback_button.click(on_rollback, [op_version], [op_message], api_visibility="private")

        # ============================================================ named API endpoints

        @shown_errors
        def next_prompt(rater: str = "", request: gr.Request = None) -> dict:
            """The least-rated pool prompt this rater has not rated: {"prompt_id", "text"} (both null when none is left)."""
            return app.next_prompt(app.rater(request, rater))

        @shown_errors
        def generate(prompt: str, n: int = app.sampling.num_candidates, rater: str = "",
                     request: gr.Request = None) -> list:
            """Generate n candidates with the serving version and record them: [{"generation_id", "prompt_id", "text", "version"}]."""
            return app.generate(prompt, n, app.rater(request, rater))

        @shown_errors
        def rate(generation_id: int, score: int, comment: str = "", rater: str = "",
                 request: gr.Request = None) -> dict:
            """Rate a generation 1..5 with an optional comment: {"ok": true}."""
            return app.rate(generation_id, score, comment, app.rater(request, rater))

        @shown_errors
        def prefer(chosen_id: int, rejected_ids: list[int], rater: str = "", request: gr.Request = None) -> dict:
            """Record that chosen_id is better than each of rejected_ids (same prompt): {"ok": true}."""
            return app.prefer(chosen_id, rejected_ids, app.rater(request, rater))

        @shown_errors
        def status() -> dict:
            """Serving and latest version, worker state, counts, and per version {"version", "mean_rating", "n_ratings"}."""
            record = dict(app.status())
            record.pop("adapter_versions")
            return record

        @shown_errors
        def rollback(version: int, request: gr.Request = None) -> dict:
            """(admin) Serve an earlier version (0 = base model) from now on: {"ok", "rolled_back", "serving_version"}."""
            app.require_admin(request, "roll back")
            return app.rollback(version)

        gr.api(next_prompt, api_name="next_prompt", concurrency_limit=None)
        gr.api(generate, api_name="generate", concurrency_id="model", concurrency_limit=1)
        gr.api(rate, api_name="rate", concurrency_limit=None)
        gr.api(prefer, api_name="prefer", concurrency_limit=None)
        gr.api(status, api_name="status", concurrency_limit=None)
        gr.api(rollback, api_name="rollback")

        @shown_errors
        def export_adapter(version: float, request: gr.Request):
            """(admin) The version's adapter directory as a zip file."""
            app.require_admin(request, "download adapters")
            return app.export_adapter(version)

        adapter_button.click(export_adapter, [op_version], [adapter_file], api_name="export_adapter",
                             api_description="(admin) Download a version's adapter as a zip (a PEFT folder).")

        @shown_errors
        def export_ratings(fmt: str, request: gr.Request):
            """(admin) The ratings export as JSONL."""
            app.require_admin(request, "export ratings")
            return app.export_ratings(fmt)

        export_button.click(export_ratings, [export_format], [export_file], api_name="export_ratings",
                            api_description="(admin) Download the ratings as JSONL: preference, unpaired or ratings.")
    return demo


def launch_options(app: FeedbackApp) -> dict[str, Any]:
    """Return the keyword arguments of `demo.launch` that the page needs: login, keyboard script."""
    options: dict[str, Any] = {"head": KEYBOARD_HEAD, "show_error": True}
    if app.users is not None:
        options["auth"] = app.users.check
        options["auth_message"] = "Log in to rate the model's answers."
    return options
