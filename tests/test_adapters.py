"""Adapter versions on the tiny GPT-2: atomic publish, crash leftovers, in-place loading, verify, rollback."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from db import Cursor, FeedbackStore, StoreError, VersionRecord
from store_fixtures import migrated_sqlite_template
from ppo_feedback import adapters
from ppo_feedback.adapters import AdapterState, AdapterStore, VersionConflict, VersionLifecycle, apply_version
from ppo_feedback.config import LoraSettings, ModelConfig
from ppo_feedback.modeling import add_lora, load_model
from ppo_feedback.policy import PolicyWithValueHead
from ppo_feedback.versions import AdapterLoadError

PROBE = "The weather today is"


# ---------------------------------------------------------------- helpers (test_serving uses them too)

def make_policy(model_dir) -> PolicyWithValueHead:
    """Return a fresh tiny policy: base model + untrained LoRA (r=4) + zero value head."""
    loaded = load_model(ModelConfig(model=str(model_dir), device="cpu"))
    torch.manual_seed(0)
    return PolicyWithValueHead(add_lora(loaded.model, LoraSettings(lora_r=4, lora_alpha=8)), loaded.tokenizer)


@torch.no_grad()
def perturb(policy: PolicyWithValueHead, seed: int) -> None:
    """Give the LoRA B matrices and the value head random weights, as training would."""
    generator = torch.Generator().manual_seed(seed)
    for name, p in policy.named_parameters():
        if "lora_B" in name or name.startswith("value_head."):
            p.copy_(torch.randn(p.shape, generator=generator) * 0.5)


@torch.no_grad()
def logits(policy: PolicyWithValueHead) -> torch.Tensor:
    """Return the policy's next-token logits for a fixed probe prompt, (1, T, V)."""
    ids = policy.tokenizer(PROBE, return_tensors="pt")["input_ids"]
    return policy.peft_model(input_ids=ids).logits


def publish(store_dir: AdapterStore, policy, store, parent: int = 0, *, write_extra=None, **overrides) -> int:
    """Publish the policy's current weights with small made-up feedback numbers; return the version."""
    settings = dict(base_model="tiny", parent=parent, cursor=Cursor(0, 0), n_ratings=3, n_preferences=1,
                    metrics={"objective/kl": 0.5})
    settings.update(overrides)
    return VersionLifecycle(store, store_dir).publish(policy, VersionRecord(**settings), write_extra=write_extra)


@pytest.fixture
def store(tmp_path):
    """A SQLite feedback store at the newest schema."""
    path = tmp_path / "feedback.db"
    shutil.copyfile(migrated_sqlite_template(), path)
    feedback_store = FeedbackStore(path)
    yield feedback_store
    feedback_store.close()


@pytest.fixture
def policy(tiny_model_dir):
    return make_policy(tiny_model_dir)


@pytest.fixture
def store_dir(tmp_path):
    return AdapterStore(tmp_path / "adapters")


# --------------------------------------------------------------------------------------- tests

def test_publish_writes_files_metadata_and_store_row(policy, store, store_dir):
    perturb(policy, 1)
    version = publish(store_dir, policy, store, write_extra=lambda d: (d / "notes.txt").write_bytes(b"hello"))

    assert version == 1
    directory = store_dir.path(1)
    assert directory.name == "v0001"
    names = {p.name for p in directory.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "value_head.safetensors", "metadata.json",
            "notes.txt"} <= names
    assert not any(p.name.startswith(".tmp-") for p in store_dir.root.iterdir())
    meta = store_dir.read_metadata(1)
    assert (meta["version"], meta["parent"], meta["base_model"]) == (1, 0, "tiny")
    assert (meta["n_ratings"], meta["n_preferences"], meta["metrics"]) == (3, 1, {"objective/kl": 0.5})
    assert set(meta["files"]) == names - {"metadata.json"}
    assert json.loads((directory / "adapter_config.json").read_text())["r"] == 4
    assert meta["cursor"] == {"rating_id": 0, "preference_id": 0}
    row = store.get_version(1)  # the same record as the metadata
    assert (row.status, row.parent, row.n_ratings, row.path) == ("published", 0, 3, str(directory.resolve()))
    assert (row.n_preferences, row.cursor, row.metrics) == (1, Cursor(0, 0), meta["metrics"])
    assert store.serving_version() == 1
    assert store_dir.verify(1, all_files=True) == meta


def test_versions_increase(policy, store, store_dir):
    assert [publish(store_dir, policy, store, parent=p) for p in (0, 1, 2)] == [1, 2, 3]
    assert store_dir.versions_on_disk() == [1, 2, 3]
    assert store.serving_version() == 3


def test_crash_while_writing_leaves_no_version_and_tmp_is_cleaned_by_next_publish(policy, store, store_dir,
                                                                                    monkeypatch):
    def disk_full(path):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(adapters, "_fsync_file", disk_full)
        patch.setattr(adapters, "_remove", lambda path: None)  # as if the process died: no clean-up
        with pytest.raises(OSError, match="No space"):
            publish(store_dir, policy, store)

    leftovers = [p.name for p in store_dir.root.iterdir()]
    assert len(leftovers) == 1 and leftovers[0].startswith(".tmp-")  # half a version, under its tmp name
    assert store_dir.versions_on_disk() == [] and store.list_versions() == [] and store.serving_version() == 0

    assert publish(store_dir, policy, store) == 1
    assert [p.name for p in store_dir.root.iterdir()] == ["v0001"]


def test_failed_write_cleans_up_at_once(policy, store, store_dir, monkeypatch):
    monkeypatch.setattr(adapters, "_fsync_dir", lambda path: (_ for _ in ()).throw(OSError("I/O error")))
    with pytest.raises(OSError):
        publish(store_dir, policy, store)
    assert list(store_dir.root.iterdir()) == [] and store.list_versions() == []


def test_failure_after_the_rename_removes_the_version(policy, store, store_dir, monkeypatch):
    real = adapters._fsync_dir

    def failing_on_root(path):
        if path == store_dir.root:
            raise OSError("I/O error")
        real(path)

    monkeypatch.setattr(adapters, "_fsync_dir", failing_on_root)
    with pytest.raises(OSError, match="I/O error"):
        publish(store_dir, policy, store)
    assert list(store_dir.root.iterdir()) == [] and store.list_versions() == []


def test_store_refusal_leaves_no_directory(policy, store, store_dir):
    with pytest.raises(StoreError, match="parent"):
        publish(store_dir, policy, store, parent=7)  # not a published version
    assert list(store_dir.root.iterdir()) == [] and store.list_versions() == []


def test_bad_metrics_fail_before_anything_is_written(policy, store, store_dir):
    with pytest.raises(ValueError):
        publish(store_dir, policy, store, metrics={"loss": float("nan")})
    assert not store_dir.root.exists() or list(store_dir.root.iterdir()) == []


def test_crash_between_rename_and_store_is_never_served_and_cleaned_later(policy, store, store_dir, monkeypatch):
    with monkeypatch.context() as patch:
        patch.setattr(store, "publish_version", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
        patch.setattr(adapters, "_remove", lambda path: None)  # killed before it could undo the rename
        with pytest.raises(KeyboardInterrupt):
            publish(store_dir, policy, store)
    assert store_dir.versions_on_disk() == [1] and store.serving_version() == 0  # complete, but unpublished

    assert store_dir.next_version(store) == 2 and store.next_version_number() == 1
    assert publish(store_dir, policy, store) == 2  # never reuses the orphan's number
    assert store_dir.clean_stale(store) == [store_dir.path(1)]
    assert store_dir.versions_on_disk() == [2] and store.serving_version() == 2


def test_losing_a_publish_race_raises_and_keeps_nothing(policy, store, store_dir, monkeypatch):
    other = store_dir.path(1)
    other.mkdir(parents=True)
    (other / "adapter_model.safetensors").write_bytes(b"the other publisher's")
    monkeypatch.setattr(AdapterStore, "next_version", lambda self, store: 1)  # it renamed after we looked
    with pytest.raises(VersionConflict):
        publish(store_dir, policy, store)
    assert [p.name for p in store_dir.root.iterdir()] == ["v0001"]
    assert (other / "adapter_model.safetensors").read_bytes() == b"the other publisher's"
    assert store.list_versions() == []


def test_apply_v1_then_v0_gives_back_the_base_logits_exactly(policy, store, store_dir):
    initial = AdapterState.initial(policy)
    base = logits(policy)
    perturb(policy, 1)
    trained = logits(policy)
    publish(store_dir, policy, store)
    assert not torch.allclose(trained, base)

    assert apply_version(policy, store_dir.root, 0, initial=initial) is None
    assert torch.equal(logits(policy), base)
    assert apply_version(policy, store_dir.root, 1) == store_dir.path(1)
    assert torch.equal(logits(policy), trained)
    assert not torch.equal(policy.value_head.weight, torch.zeros_like(policy.value_head.weight))
    apply_version(policy, store_dir.root, 0, initial=initial)
    assert torch.equal(logits(policy), base)
    assert torch.count_nonzero(policy.value_head.weight) == 0

    apply_version(policy, store_dir.root, 1)
    apply_version(policy, store_dir.root, 0)  # without a snapshot: LoRA B zeroed, still exactly the base
    assert torch.equal(logits(policy), base)


def test_interpolate_puts_every_weight_on_the_line_between_two_copies(policy):
    start = AdapterState.capture(policy)
    perturb(policy, 1)
    end = AdapterState.capture(policy)
    lora = next(name for name in start._saved if "lora_B" in name)
    a, b = start._saved[lora], end._saved[lora]
    assert not torch.equal(a, b)
    start.interpolate(end, 0.25)
    assert torch.allclose(dict(policy.named_parameters())[lora], a + 0.25 * (b - a))
    start.interpolate(end, 1.0)
    assert all(torch.equal(p, end._saved[name]) for name, p in policy.named_parameters() if name in end._saved)
    start.interpolate(end, 0.0)
    assert all(torch.equal(p, start._saved[name]) for name, p in policy.named_parameters() if name in start._saved)


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "metadata"])
def test_damaged_version_is_refused_and_weights_stay(policy, store, store_dir, damage):
    perturb(policy, 1)
    publish(store_dir, policy, store)
    weights = store_dir.path(1) / "adapter_model.safetensors"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:100])
    elif damage == "flip":  # still a readable safetensors file, only the numbers changed
        data = bytearray(weights.read_bytes())
        data[-8:] = b"\x00\x00\x80\x7f" * 2
        weights.write_bytes(bytes(data))
    elif damage == "delete":
        weights.unlink()
    else:
        (store_dir.path(1) / "metadata.json").write_text("{not json")
    perturb(policy, 2)
    before = logits(policy)

    with pytest.raises(AdapterLoadError):
        apply_version(policy, store_dir.root, 1)
    assert torch.equal(logits(policy), before)


def test_verify_asks_the_store_and_the_checksums(policy, store, store_dir):
    versions = VersionLifecycle(store, store_dir)
    publish(store_dir, policy, store)
    publish(store_dir, policy, store, parent=1)
    assert versions.verify(2, published=True) == store_dir.read_metadata(2)
    assert store.rollback_to(1) == [2]
    assert versions.verify(2)["version"] == 2  # a rolled-back version still loads (the compare view)
    with pytest.raises(AdapterLoadError, match="rolled_back, not published"):
        versions.verify(2, published=True)
    store.record_failed_version(3, 1, "diverged")
    with pytest.raises(AdapterLoadError, match="failed in training"):
        versions.verify(3)
    (store_dir.path(1) / "adapter_model.safetensors").write_bytes(b"altered")
    with pytest.raises(AdapterLoadError, match="adapter_model.safetensors is corrupt"):
        versions.verify(1, published=True)
    with pytest.raises(StoreError):
        versions.verify(9)


def test_rollback_loads_the_version_before_telling_the_store(policy, store, store_dir):
    versions = VersionLifecycle(store, store_dir)
    initial = AdapterState.initial(policy)
    base = logits(policy)
    perturb(policy, 1)
    first = logits(policy)
    publish(store_dir, policy, store)
    perturb(policy, 2)
    publish(store_dir, policy, store, parent=1)
    publish(store_dir, policy, store, parent=2)
    (store_dir.path(2) / "value_head.safetensors").write_bytes(b"garbage")
    before = logits(policy)

    with pytest.raises(AdapterLoadError, match="value_head"):
        versions.roll_back(policy, 2)
    assert store.serving_version() == 3 and torch.equal(logits(policy), before)  # refused: nothing changed
    with pytest.raises(AdapterLoadError, match="not on disk"):
        versions.roll_back(policy, 9)
    assert versions.roll_back(policy, 1) == [2, 3]
    assert store.serving_version() == 1 and torch.equal(logits(policy), first)
    with pytest.raises(StoreError, match="rolled_back"):
        versions.roll_back(policy, 3)  # its files load, but the store serves no rolled-back version
    assert store.serving_version() == 1 and torch.equal(logits(policy), first)  # the load was undone
    assert versions.roll_back(policy, 0, initial=initial) == [1]
    assert store.serving_version() == 0 and torch.equal(logits(policy), base)
