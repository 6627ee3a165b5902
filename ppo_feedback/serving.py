"""The UI's model: generate with the adapter version being served, and hot-swap versions in place.

One base model with one LoRA adapter, no gradients. A daemon thread asks the store every couple of
seconds which version to serve (`store.serving_version()`) and copies that version's weights into
the adapter in place: the base model is never reloaded. Generation and swapping share one lock, so
a request in flight finishes on the weights it started with and a swap waits for it; a swap that is
waiting closes a turnstile, so new requests queue behind it instead of starving it.

A version whose files are missing, corrupt or do not fit is refused: serving stays on the current
version, `last_swap_error` says why, and the version is not tried again until the store names
another one.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from db.records import BASE_VERSION, Generation, NewGeneration
from .adapters import AdapterState, AdapterStore, VersionLifecycle
from .config import LoraSettings, ModelConfig, SamplingConfig
from .generation import Candidate, generate, stream_candidates
from .policy import PolicyWithValueHead

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SwapEvent:
    """One attempt to change the served version, for the UI's toasts and the status panel."""

    version: int  # the version asked for
    previous: int  # the version served before the attempt
    ok: bool  # True when `version` is now served
    error: str | None  # why it was refused, when not ok
    locked_s: float  # seconds generation was paused for the weight copy (0 when refused before it)
    at: datetime


@dataclass(frozen=True)
class PageProgress:
    """One update of a page being generated: each candidate's text so far, and at the end the page as recorded."""

    texts: list[str]  # one per candidate, in order
    version: int  # the adapter version generating them
    generations: list[Generation] | None = None  # the recorded page, on the last update only


class ServingModel:
    """The serving policy (base + LoRA), the store it records to, and the adapter versions it swaps between."""

    def __init__(self, policy: PolicyWithValueHead, store, adapters_root: str | Path, *, base_model: str = "",
                 sampling: SamplingConfig | None = None, max_events: int = 100):
        self.policy = policy
        self.tokenizer = policy.tokenizer
        self.store = store
        self.adapters = AdapterStore(adapters_root)
        self.versions = VersionLifecycle(store, self.adapters)
        self.base_model = base_model
        self.sampling = sampling or SamplingConfig()
        self.last_swap_error: str | None = None
        self._initial = AdapterState.initial(policy)  # version 0; the policy must be fresh from add_lora
        self._version = BASE_VERSION
        self._failed_version: int | None = None
        self._lock = threading.Lock()  # the weights: held while generating and while swapping
        self._turnstile = threading.Lock()  # held by a waiting swap so new requests queue behind it
        self._swap_lock = threading.RLock()  # one version change at a time
        self._events: deque[SwapEvent] = deque(maxlen=max_events)
        self._listeners: list[Callable[[SwapEvent], None]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def load(cls, model_config: ModelConfig, lora: LoraSettings, store, adapters_root: str | Path, *,
             sampling: SamplingConfig | None = None, weights: str = "same") -> ServingModel:
        """Return a ServingModel on a freshly loaded base model + LoRA, already serving the store's version.

        `weights`: "int8" decodes with the base's linear layers in dynamic int8 (`ppo_feedback.int8`)."""
        from .int8 import quantize_base_linears
        from .modeling import add_lora, load_model

        loaded = load_model(model_config)
        peft_model = add_lora(loaded.model, lora)
        if weights == "int8":
            log.info("serving with int8 base weights: %d linear layers quantised", quantize_base_linears(peft_model))
        policy = PolicyWithValueHead(peft_model, loaded.tokenizer)
        serving = cls(policy, store, adapters_root, base_model=loaded.spec, sampling=sampling)
        serving.poll_once()
        return serving

    # ------------------------------------------------------------------------------ state

    @property
    def version(self) -> int:
        """Return the adapter version being served (0 = base model)."""
        return self._version

    @property
    def events(self) -> list[SwapEvent]:
        """Return the latest swap attempts, oldest first."""
        return list(self._events)

    def add_listener(self, callback: Callable[[SwapEvent], None]) -> None:
        """Call `callback(event)` after every swap attempt (from the polling thread); returns nothing."""
        self._listeners.append(callback)

    @contextmanager
    def _request_turn(self) -> Iterator[None]:
        with self._turnstile:  # blocks while a swap is waiting for the weights
            pass
        with self._lock:
            yield

    @contextmanager
    def _swap_turn(self) -> Iterator[None]:
        with self._turnstile, self._lock:
            yield

    # ------------------------------------------------------------------------- generation

    def _sampling(self, n: int | None, max_new_tokens: int | None, temperature: float | None,
                  top_p: float | None) -> SamplingConfig:
        """Return the request's sampling settings (defaults from `self.sampling`), validated."""
        chosen = {"num_candidates": n, "max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p}
        settings = dataclasses.replace(self.sampling, **{k: v for k, v in chosen.items() if v is not None})
        settings.validate()
        return settings

    def _sample(self, prompt: str, s: SamplingConfig, seed: int | None) -> list[Candidate]:
        candidates = generate(self.policy.peft_model, self.tokenizer, prompt, s.num_candidates, s.max_new_tokens,
                              temperature=s.temperature, top_p=s.top_p, seed=seed)
        return [displayable(c) for c in candidates]

    def generate_stream(self, prompt: str | None, n: int | None = None, *, rater: str, prompt_id: int | None = None,
                        seed: int | None = None, max_new_tokens: int | None = None, temperature: float | None = None,
                        top_p: float | None = None, page_id: int | None = None,
                        admit_prompt: bool = False) -> Iterator[PageProgress]:
        """Sample n candidates with the served version in one batch and record them as one page, streaming:
        yield a PageProgress after every decode step (each candidate's text so far), then one with the
        recorded generations.

        The weights lock is held from the first step to the last, so a swap waits for the page; closing
        the generator (a client that went away) releases it at the step it is in. Arguments and errors
        as `generate`'s.
        """
        if not isinstance(rater, str) or not rater.strip():
            raise ValueError("a generation request needs the rater's name")
        settings = self._sampling(n, max_new_tokens, temperature, top_p)
        if prompt_id is not None:
            stored = self.store.get_prompt(prompt_id).text
            if prompt is not None and prompt != stored:
                raise ValueError(f"prompt {prompt_id} has other text than the prompt given")
            prompt = stored
        if prompt is None:
            raise ValueError("give a prompt or a prompt_id")
        with self._request_turn():
            version = self._version
            stream = stream_candidates(self.policy.peft_model, self.tokenizer, prompt, settings.num_candidates,
                                       settings.max_new_tokens, settings.temperature, settings.top_p, seed)
            while True:
                try:
                    texts = next(stream)
                except StopIteration as stop:
                    candidates = [displayable(c) for c in stop.value]
                    break
                yield PageProgress([displayable_text(t) for t in texts], version)
        if prompt_id is None:
            prompt_id = self.store.add_prompt(prompt, source="rater", added_by=rater, admitted=admit_prompt)
        params = {"temperature": settings.temperature, "top_p": settings.top_p,
                  "max_new_tokens": settings.max_new_tokens, "seed": seed}
        log.info("rater %r: %d generations of prompt %d with version %d", rater.strip(), len(candidates),
                 prompt_id, version)
        generations = self.store.record_generations(
            prompt_id, version, [NewGeneration(c.text, c.token_ids, c.logprobs, params) for c in candidates],
            rater=rater, page_id=page_id)
        yield PageProgress([g.text for g in generations], version, generations)

    def generate(self, prompt: str | None, n: int | None = None, *, rater: str, prompt_id: int | None = None,
                 seed: int | None = None, max_new_tokens: int | None = None, temperature: float | None = None,
                 top_p: float | None = None, page_id: int | None = None, admit_prompt: bool = False) -> list[Generation]:
        """Sample n candidates with the served version and record them as one page; return the stored generations.

        The request is a page of its own, asked for by `rater` (`store.record_generations`); with
        `page_id` the candidates join that page instead (the page's rater and prompt must match),
        for a page that fills its candidates in over several requests. Each record has its id,
        `page_id`, text and `adapter_version`, the version that produced it. Without `prompt_id`
        the prompt is a rater's own and is added to the store (source "rater") once it could be
        generated from, pending an admin's review unless `admit_prompt` (an admin typed it); with
        it, the stored prompt is used (`prompt` may be None, and if given must be the same text). Raises PromptError, ValueError or StoreError on bad input.
        `generate_stream` run to its end.
        """
        *_, last = self.generate_stream(prompt, n, rater=rater, prompt_id=prompt_id, seed=seed,
                                        max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                        page_id=page_id, admit_prompt=admit_prompt)
        return last.generations

    def generate_with_version(self, prompt: str, version: int, seed: int | None = None, *, n: int = 1,
                              max_new_tokens: int | None = None, temperature: float | None = None,
                              top_p: float | None = None) -> list[Candidate]:
        """Sample from any stored version (0 = base model) for side-by-side comparison; return the candidates.

        Nothing is recorded and the served version is unchanged afterwards: another version's
        weights are swapped in, used and swapped back while requests wait. Raises AdapterLoadError
        when that version cannot be loaded, StoreError when the store does not know it.
        """
        settings = self._sampling(n, max_new_tokens, temperature, top_p)
        if version != BASE_VERSION:
            self.versions.verify(version)
        with self._request_turn():
            if version == BASE_VERSION:
                with self.policy.peft_model.disable_adapter():
                    return self._sample(prompt, settings, seed)
            if version == self._version:
                return self._sample(prompt, settings, seed)
            served = AdapterState.capture(self.policy)
            try:
                with _one_torch_thread():
                    self.versions.apply(self.policy, version, verify=False)
                return self._sample(prompt, settings, seed)
            finally:
                served.restore()

    # ---------------------------------------------------------------------------- swapping

    def swap_to(self, version: int) -> bool:
        """Serve `version` now; return True when it is served, False when it was refused (see `last_swap_error`).

        `poll_once` calls this with the store's choice; a direct call serves any published version
        until the next poll. The weights are checked against their checksums before the lock is
        taken, so requests pause only for the copy.
        """
        with self._swap_lock:
            previous = self._version
            if version == previous:
                return True
            locked_s = 0.0
            try:
                if version != BASE_VERSION:
                    self._check_servable(version)
                with self._swap_turn(), _one_torch_thread():
                    start = time.perf_counter()
                    served = AdapterState.capture(self.policy)
                    try:
                        self.versions.apply(self.policy, version, initial=self._initial, verify=False)
                    except BaseException:
                        served.restore()  # never serve half of a version
                        raise
                    self._version = version
                    locked_s = time.perf_counter() - start
            except Exception as exc:  # noqa: BLE001 - any failure keeps the current version serving
                self.last_swap_error = f"version {version} refused, still serving {previous}: {exc}"
                log.error("%s", self.last_swap_error)
                self._emit(SwapEvent(version, previous, False, self.last_swap_error, locked_s, _now()))
                return False
            self._swapped(previous, locked_s)
            return True

    def _check_servable(self, version: int) -> None:
        """Raise unless `version` is published in the store and its files match their checksums."""
        meta = self.versions.verify(version, published=True)
        if self.base_model and meta.get("base_model") not in (None, self.base_model):
            log.warning("version %d was trained on %r; serving %r", version, meta.get("base_model"),
                        self.base_model)

    def _swapped(self, previous: int, locked_s: float) -> None:
        """Tell the log and the listeners that the served version changed from `previous`; returns nothing."""
        self.last_swap_error = None
        log.info("now serving adapter version %d (was %d; weights locked %.1f ms)", self._version, previous,
                 locked_s * 1000)
        self._emit(SwapEvent(self._version, previous, True, None, locked_s, _now()))

    def poll_once(self) -> int:
        """Swap to the store's serving version unless it is served or already refused; return the version served.

        The store is asked under the swap lock: a target read before another swap (a rollback, a
        concurrent poll) would otherwise swap back to what the store named before it."""
        with self._swap_lock:
            target = self.store.serving_version()
            if target == self._version:
                self._failed_version = None  # the store no longer names a refused version
                self.last_swap_error = None
            elif target != self._failed_version:
                self._failed_version = None if self.swap_to(target) else target
            return self._version

    def rollback(self, version: int) -> list[int]:
        """Serve an earlier published version (0 = base) from now on; return the versions rolled back.

        The version is loaded in place first and the store told only once it loaded. Raises
        AdapterLoadError (files missing, corrupt or not fitting) or StoreError (not a published
        version), serving and the store unchanged, when it cannot be served.
        """
        with self._swap_lock:
            previous = self._version
            with self._swap_turn(), _one_torch_thread():
                start = time.perf_counter()
                rolled_back = self.versions.roll_back(self.policy, version, initial=self._initial)
                self._version = version
                locked_s = time.perf_counter() - start
            if version != previous:
                self._swapped(previous, locked_s)
            self.poll_once()
            return rolled_back

    def _emit(self, event: SwapEvent) -> None:
        self._events.append(event)
        for callback in list(self._listeners):
            try:
                callback(event)
            except Exception:  # noqa: BLE001 - a broken listener must not stop swapping
                log.exception("swap listener %r failed", callback)

    # ----------------------------------------------------------------------------- polling

    def start_polling(self, interval: float = 2.0) -> None:
        """Poll the store every `interval` seconds in a daemon thread (no-op if already polling); returns nothing."""
        if interval <= 0:
            raise ValueError("the polling interval must be positive")
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._poll_loop, args=(interval,), name="adapter-poller", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the polling thread and wait up to `timeout` seconds for it; returns nothing."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _poll_loop(self, interval: float) -> None:
        failing = False
        while not self._stop.is_set():
            try:
                self.poll_once()
                failing = False
            except Exception as exc:  # noqa: BLE001 - a database hiccup must not end polling
                if not failing:
                    log.warning("cannot ask the store which version to serve (%s); will keep trying", exc)
                failing = True
            self._stop.wait(interval)


NUL_REPLACEMENT = "\ufffd"
"""What a sampled NUL character becomes in candidate text (U+FFFD REPLACEMENT CHARACTER)."""


def displayable(candidate: Candidate) -> Candidate:
    """Return the candidate with every NUL character of its text replaced by U+FFFD (token ids unchanged).

    A model can sample the byte-0 token (the randomly initialised test model now and then does); the
    store refuses text holding NUL (and so would a page), so the sampled text is recorded and shown with
    U+FFFD in its place. A prompt typed with NUL is the rater's input and still gets the store's error.
    """
    if "\x00" not in candidate.text:
        return candidate
    return dataclasses.replace(candidate, text=displayable_text(candidate.text))


def displayable_text(text: str) -> str:
    """Return text with every NUL character replaced by U+FFFD (see `displayable`)."""
    return text.replace("\x00", NUL_REPLACEMENT)


@contextmanager
def _one_torch_thread() -> Iterator[None]:
    """Run torch single-threaded inside (the caller holds the weights lock, so nothing else computes).

    A swap is many copies of small tensors; on a busy machine each parallel op would wait at an
    OpenMP barrier for a descheduled thread (README, "Measured results behind design choices").
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _now() -> datetime:
    return datetime.now(timezone.utc)
