"""The worker never stays down: a version it cannot load, a database outage, damaged training state."""
from __future__ import annotations

import pytest
import torch
from sqlalchemy.exc import OperationalError

from db.records import Cursor, VersionRecord
from ppo_feedback.adapters import VersionLifecycle
from ppo_feedback.trainer import OPTIMIZER_FILE
from ppo_feedback.versions import ADAPTER_WEIGHTS, AdapterLoadError
from test_worker import lora_weights, make_worker, rated_store  # noqa: F401  (a fixture)


def publish_untrained(worker, parent: int = 0) -> int:
    """Publish the worker's current weights (with optimizer state) as the next version, trained on no feedback."""
    record = VersionRecord(parent=parent, base_model="tiny", cursor=Cursor(), n_ratings=0, n_preferences=0,
                           metrics={})
    return VersionLifecycle(worker.store, worker.adapters).publish(
        worker.policy, record, write_extra=lambda d: worker.trainer.save_state(d, include_adapter=False))


def flip_byte(path, offset: int = -20) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(data)


def record_states(worker) -> list[str]:
    states: list[str] = []
    real = worker.heartbeat.set_state
    worker.heartbeat.set_state = lambda state: (states.append(state), real(state))[1]
    return states


def test_a_corrupt_newest_version_is_skipped_and_training_goes_on_from_the_last_loadable_one(
        tmp_path, tiny_model_dir, rated_store):
    worker = make_worker(tmp_path, tiny_model_dir, rated_store)
    assert publish_untrained(worker) == 1
    flip_byte(worker.adapters.path(1) / ADAPTER_WEIGHTS)
    states = record_states(worker)
    assert worker.run(max_rounds=1) == 1  # today: AdapterLoadError ends the worker
    v2 = rated_store.get_version(2)
    assert v2.status == "published" and v2.parent == 0  # trained from the base, not from the corrupt v1
    assert 1 in worker.unloadable and "corrupt" in worker.unloadable[1]
    assert any("version 1 cannot be loaded: training from version 0" in s for s in states), states


def test_a_database_outage_is_retried_not_fatal(tmp_path, tiny_model_dir, rated_store):
    worker = make_worker(tmp_path, tiny_model_dir, rated_store)
    real, calls = rated_store.serving_version, []

    def flaky():
        calls.append(1)
        if len(calls) == 1:
            raise OperationalError("SELECT max(version)", {}, Exception("could not connect to server"))
        return real()

    rated_store.serving_version = flaky
    states = record_states(worker)
    assert worker.run(max_rounds=1) == 1  # today: the OperationalError ends the worker
    assert rated_store.serving_version() == 1
    assert any(s.startswith("error (OperationalError), retrying in") for s in states), states


def test_an_error_mid_round_restores_the_weights_before_retrying(tmp_path, tiny_model_dir, rated_store):
    worker = make_worker(tmp_path, tiny_model_dir, rated_store)
    before = lora_weights(worker)

    def outage(*_args):
        raise OperationalError("INSERT INTO training_metrics", {}, Exception("server closed the connection"))

    rated_store.record_metrics = outage  # after the first iteration's optimizer step
    worker.stop_requested.wait = lambda _delay: worker.stop_requested.set()  # stop at the first back-off
    assert worker.run() == 0
    assert all(torch.equal(a, b) for a, b in zip(before, lora_weights(worker)))
    assert rated_store.list_versions() == []


@pytest.mark.parametrize("damaged", [OPTIMIZER_FILE, "trainer_state.json"])
def test_damaged_optimizer_or_trainer_state_is_refused(tmp_path, tiny_model_dir, rated_store, damaged):
    worker = make_worker(tmp_path, tiny_model_dir, rated_store)
    assert publish_untrained(worker) == 1
    flip_byte(worker.adapters.path(1) / damaged, offset=5)
    fresh = make_worker(tmp_path, tiny_model_dir, rated_store)
    before = lora_weights(fresh)
    with pytest.raises(AdapterLoadError, match=f"{damaged} is corrupt"):
        fresh.load_version(1)  # today: loaded without a check
    assert fresh.loaded_version is None
    assert all(torch.equal(a, b) for a, b in zip(before, lora_weights(fresh)))
    assert fresh.load_trainable(1) == 0 and "version 1 cannot be loaded" in fresh.note


def test_a_round_prunes_old_versions_files(tmp_path, tiny_model_dir, rated_store):
    worker = make_worker(tmp_path, tiny_model_dir, rated_store, keep_versions=2)
    assert publish_untrained(worker) == 1 and publish_untrained(worker, parent=1) == 2
    assert worker.run(max_rounds=1) == 1
    assert worker.adapters.versions_on_disk() == [2, 3]
    assert rated_store.get_version(1).pruned_at is not None
