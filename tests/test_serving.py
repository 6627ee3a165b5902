"""Serving on the tiny GPT-2: generations tagged with their version, hot swaps, refusals, rollback."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from db import StoreError
from ppo_feedback.config import SamplingConfig
from ppo_feedback.serving import ServingModel
from test_adapters import logits, make_policy, perturb, publish, store, store_dir  # noqa: F401  (fixtures)

FAST = SamplingConfig(num_candidates=2, max_new_tokens=6)


@pytest.fixture
def trainer_policy(tiny_model_dir):
    """The worker's policy, whose perturbed weights get published."""
    return make_policy(tiny_model_dir)


@pytest.fixture
def serving(tiny_model_dir, store, store_dir):
    model = ServingModel(make_policy(tiny_model_dir), store, store_dir.root, base_model="tiny", sampling=FAST)
    yield model
    model.stop()


def publish_trained(store_dir, trainer_policy, store, seed: int, parent: int) -> tuple[int, torch.Tensor]:
    """Publish a version with weights drawn from `seed`; return it and the logits it should serve."""
    perturb(trainer_policy, seed)
    return publish(store_dir, trainer_policy, store, parent=parent), logits(trainer_policy)


def test_generations_are_recorded_with_the_served_version(serving, store, store_dir, trainer_policy):
    base = logits(serving.policy)
    first = serving.generate("Once upon a time", rater="ana", seed=1)
    assert len(first) == 2 and {g.adapter_version for g in first} == {0}
    prompt = store.get_prompt(first[0].prompt_id)
    assert (prompt.text, prompt.source) == ("Once upon a time", "rater")
    stored = store.get_generation(first[0].id)
    assert stored.text == first[0].text and len(stored.token_ids) == len(stored.logprobs) > 0
    assert stored.sampling == {"temperature": 1.0, "top_p": 1.0, "max_new_tokens": 6, "seed": 1}

    version, expected = publish_trained(store_dir, trainer_policy, store, seed=1, parent=0)
    assert serving.poll_once() == version == serving.version == 1
    assert torch.equal(logits(serving.policy), expected) and not torch.equal(expected, base)
    again = serving.generate(None, 3, rater="ana", prompt_id=prompt.id, seed=1)
    assert [g.adapter_version for g in again] == [1, 1, 1] and {g.prompt_id for g in again} == {prompt.id}
    assert [(e.version, e.previous, e.ok) for e in serving.events] == [(1, 0, True)]
    # each request is one page of the rater who asked, with the version then serving
    assert len({g.page_id for g in first}) == len({g.page_id for g in again}) == 1
    pages = [store.get_page(first[0].page_id), store.get_page(again[0].page_id)]
    assert [(p.prompt_id, p.rater, p.adapter_version) for p in pages] == [(prompt.id, "ana", 0), (prompt.id, "ana", 1)]


def test_a_request_can_fill_in_its_own_page_only(serving, store):
    first = serving.generate("Once upon a time", 1, rater="ana", seed=1)
    page_id = first[0].page_id
    rest = serving.generate(None, 2, rater="ana", prompt_id=first[0].prompt_id, seed=2, page_id=page_id)
    assert [g.id for g in store.page_generations(page_id)] == [first[0].id, *(g.id for g in rest)]
    ben = serving.generate(None, 2, rater="ben", prompt_id=first[0].prompt_id, seed=1)
    assert ben[0].page_id != page_id and store.get_page(ben[0].page_id).rater == "ben"
    with pytest.raises(StoreError, match="asked for by 'ana', not by 'ben'"):
        serving.generate(None, 1, rater="ben", prompt_id=first[0].prompt_id, page_id=page_id)
    assert store.counts()["generations"] == 5


def test_a_sampled_nul_character_is_recorded_and_shown_as_a_replacement_character(serving, store, monkeypatch):
    """The tiny model now and then samples byte 0; the store refuses NUL, so /generate used to fail."""
    import ppo_feedback.serving as serving_module
    from ppo_feedback.generation import Candidate
    from ppo_feedback.page import FeedbackApp

    def sample_nul(model, tokenizer, prompt, n, *args, **kwargs):
        return [Candidate(f"a\x00b{i}\x00", [5, 0, 6, 0], [-1.0] * 4, False) for i in range(n)]

    def stream_nul(model, tokenizer, prompt, n, *args, **kwargs):
        yield [f"a\x00b{i}" for i in range(n)]
        return sample_nul(model, tokenizer, prompt, n)

    monkeypatch.setattr(serving_module, "generate", sample_nul)
    monkeypatch.setattr(serving_module, "stream_candidates", stream_nul)
    app = FeedbackApp(serving, store, FAST)
    partial, items = app.generate_stream("Once upon a time", 2, "ana")  # the page's Generate button
    assert [i["text"] for i in partial] == ["a\ufffdb0", "a\ufffdb1"]
    assert [i["text"] for i in items] == ["a\ufffdb0\ufffd", "a\ufffdb1\ufffd"]
    items = app.generate("Once upon a time", 2, "ana")  # the page's /generate
    assert [i["text"] for i in items] == ["a\ufffdb0\ufffd", "a\ufffdb1\ufffd"]
    for item in items:
        stored = store.get_generation(item["generation_id"])
        assert stored.text == item["text"] and list(stored.token_ids) == [5, 0, 6, 0]
    assert serving.generate_with_version("Once upon a time", 0)[0].text == "a\ufffdb0\ufffd"  # compare view
    with pytest.raises(StoreError, match="NUL character"):  # a prompt typed with NUL is still refused
        serving.generate("nul\x00prompt", 1, rater="ana")


def test_generate_refuses_a_prompt_id_with_other_text(serving, store):
    prompt_id = store.add_prompt("A stored prompt", source="builtin")
    with pytest.raises(ValueError, match="other text"):
        serving.generate("Something else", rater="ana", prompt_id=prompt_id)
    with pytest.raises(ValueError, match="rater"):
        serving.generate("Hello", rater=" ")
    with pytest.raises(ValueError):
        serving.generate("Hello", FAST.max_candidates + 1, rater="ana")


@pytest.mark.parametrize("damage", ["truncate", "garbage", "missing"])
def test_a_broken_version_is_refused_and_serving_stays(serving, store, store_dir, trainer_policy, damage):
    publish_trained(store_dir, trainer_policy, store, seed=1, parent=0)
    assert serving.poll_once() == 1
    served = logits(serving.policy)
    publish_trained(store_dir, trainer_policy, store, seed=2, parent=1)
    weights = store_dir.path(2) / "adapter_model.safetensors"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "garbage":
        weights.write_bytes(b"\x93NUMPY garbage" * 100)
    else:
        weights.unlink()

    assert serving.poll_once() == 1
    assert "version 2 refused" in serving.last_swap_error and "adapter_model.safetensors" in serving.last_swap_error
    assert torch.equal(logits(serving.policy), served)
    assert serving.generate("Hello", rater="ana")[0].adapter_version == 1
    serving.poll_once()
    serving.poll_once()
    assert [(e.version, e.ok) for e in serving.events] == [(1, True), (2, False)]  # tried once, not again

    version, expected = publish_trained(store_dir, trainer_policy, store, seed=3, parent=2)
    assert serving.poll_once() == version == 3
    assert serving.last_swap_error is None and torch.equal(logits(serving.policy), expected)


def test_generation_keeps_working_during_swaps(serving, store, store_dir, trainer_policy):
    publish_trained(store_dir, trainer_policy, store, seed=1, parent=0)
    publish_trained(store_dir, trainer_policy, store, seed=2, parent=1)
    errors: list[BaseException] = []
    versions: list[int] = []
    done = threading.Event()

    def client():
        while not done.is_set():
            try:
                versions.extend(g.adapter_version for g in serving.generate("Machine learning", 1, rater="bot"))
            except BaseException as exc:  # noqa: BLE001 - the test counts every failure
                errors.append(exc)

    thread = threading.Thread(target=client)
    thread.start()
    try:
        for i in range(20):
            assert serving.swap_to(1 + i % 2)
            time.sleep(0.005)
    finally:
        done.set()
        thread.join(30)
    assert errors == [] and versions and set(versions) <= {0, 1, 2}  # 0 until the first swap
    assert all(e.ok for e in serving.events) and len(serving.events) == 20


def test_a_request_in_flight_finishes_on_the_old_weights(serving, store, store_dir, trainer_policy):
    publish_trained(store_dir, trainer_policy, store, seed=1, parent=0)
    serving.poll_once()
    publish_trained(store_dir, trainer_policy, store, seed=2, parent=1)
    stream = serving.generate_stream("Hello", 2, rater="ana", seed=1, max_new_tokens=6)
    assert next(stream).generations is None  # the first step is decoded: the page holds the weights
    swapper = threading.Thread(target=serving.poll_once)
    swapper.start()
    time.sleep(0.2)
    assert swapper.is_alive() and serving.version == 1  # the swap waits for the page
    *_, last = stream
    swapper.join(30)
    assert [g.adapter_version for g in last.generations] == [1, 1] and serving.version == 2


def test_a_stream_closed_midway_frees_the_weights_and_records_nothing(serving, store, store_dir, trainer_policy):
    publish_trained(store_dir, trainer_policy, store, seed=1, parent=0)
    stream = serving.generate_stream("Hello", 2, rater="ana", seed=1, max_new_tokens=6)
    next(stream)
    swapper = threading.Thread(target=serving.poll_once)
    swapper.start()
    time.sleep(0.2)
    assert swapper.is_alive()
    stream.close()  # the client went away (Gradio closes the generator)
    swapper.join(10)
    assert not swapper.is_alive() and serving.version == 1
    assert store.counts()["generations"] == 0
    assert serving.generate("Hello", 1, rater="ana")[0].adapter_version == 1


def test_a_streamed_page_shows_each_text_growing_then_records_it(serving, store):
    updates = list(serving.generate_stream("Once upon a time", 3, rater="ana", seed=4, max_new_tokens=8))
    *partial, last = updates
    assert 1 <= len(partial) <= 8 and all(u.generations is None and len(u.texts) == 3 for u in partial)
    assert [g.text for g in last.generations] == last.texts and {g.adapter_version for g in last.generations} == {0}
    assert len({g.page_id for g in last.generations}) == 1 and store.counts()["generations"] == 3
    for row, generation in enumerate(last.generations):
        texts = [u.texts[row] for u in partial]
        assert all(generation.text.startswith(t) for t in texts), (texts, generation.text)
        assert texts[-1] == generation.text  # the last step shows the whole text
    assert len(partial) == max(len(store.get_generation(g.id).token_ids) for g in last.generations)  # a step a token


def test_rollback_makes_serving_go_back(serving, store, store_dir, trainer_policy):
    base = logits(serving.policy)
    _, first = publish_trained(store_dir, trainer_policy, store, seed=1, parent=0)
    publish_trained(store_dir, trainer_policy, store, seed=2, parent=1)
    assert serving.poll_once() == 2

    assert serving.rollback(1) == [2]
    assert serving.version == store.serving_version() == 1
    assert torch.equal(logits(serving.policy), first)
    assert serving.generate("Hello", rater="ana")[0].adapter_version == 1
    assert serving.rollback(0) == [1]
    assert serving.version == 0 and torch.equal(logits(serving.policy), base)
    with pytest.raises(StoreError):
        serving.rollback(2)  # rolled back versions stay rolled back


def test_a_poll_that_read_the_store_before_a_rollback_is_not_applied_after_it(serving, store, store_dir,
                                                                              trainer_policy, monkeypatch):
    publish_trained(store_dir, trainer_policy, store, seed=1, parent=0)
    publish_trained(store_dir, trainer_policy, store, seed=2, parent=1)
    assert serving.poll_once() == 2
    asked, go_on = threading.Event(), threading.Event()
    read = store.serving_version

    def slow_read():  # the poller's read of the store (2), held back until the rollback had its chance
        answer = read()
        asked.set()
        go_on.wait(5)
        return answer

    monkeypatch.setattr(store, "serving_version", slow_read)
    poller = threading.Thread(target=serving.poll_once)
    poller.start()
    assert asked.wait(5)
    monkeypatch.setattr(store, "serving_version", read)
    rollback = threading.Thread(target=serving.rollback, args=(1,))
    rollback.start()
    rollback.join(0.5)  # waits for the poll that holds the swap lock, or (the race) rolls back at once
    go_on.set()
    poller.join(10)
    rollback.join(10)
    assert store.serving_version() == 1
    # the poll's stale answer was never tried after the rollback (it would be refused, as rolled back, and
    # shown to admins as a swap error until the next poll)
    assert serving.version == 1 and serving.last_swap_error is None


def test_compare_view_uses_any_version_and_swaps_back(serving, store, store_dir, trainer_policy):
    base_text = [c.text for c in serving.generate_with_version("Once upon a time", 0, seed=3, n=2)]
    publish_trained(store_dir, trainer_policy, store, seed=1, parent=0)
    publish_trained(store_dir, trainer_policy, store, seed=2, parent=1)
    serving.poll_once()
    served = logits(serving.policy)

    assert [c.text for c in serving.generate_with_version("Once upon a time", 0, seed=3, n=2)] == base_text
    old = [c.text for c in serving.generate_with_version("Once upon a time", 1, seed=3, n=2)]
    assert serving.version == 2 and torch.equal(logits(serving.policy), served)
    assert serving.swap_to(1)
    assert [c.text for c in serving.generate_with_version("Once upon a time", 1, seed=3, n=2)] == old


def test_polling_thread_swaps_and_tells_listeners(serving, store, store_dir, trainer_policy):
    seen = []
    serving.add_listener(seen.append)
    serving.start_polling(interval=0.05)
    publish_trained(store_dir, trainer_policy, store, seed=1, parent=0)
    deadline = time.monotonic() + 10
    while serving.version != 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    serving.stop()
    assert serving.version == 1 and [(e.version, e.ok) for e in seen] == [(1, True)]

