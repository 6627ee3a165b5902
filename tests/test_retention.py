"""--keep-versions: old versions' files are pruned (newest N, the serving one and exported ones stay);
their rows and metrics stay; rolling back to a pruned version is refused with a clear message."""
from __future__ import annotations

import pytest

from db import StoreError
from ppo_feedback.adapters import VersionLifecycle
from ppo_feedback.config import WorkerConfig
from ppo_feedback.export import export_adapter
from ppo_feedback.serving import ServingModel  # noqa: F401  (imported by the page: rollback goes through it)
from ppo_feedback.versions import AdapterLoadError
from test_adapters import perturb, policy, publish, store, store_dir  # noqa: F401  (fixtures)


def five_versions(store_dir, policy, store, base_model: str = "tiny") -> None:
    for version in range(1, 6):
        perturb(policy, version)
        assert publish(store_dir, policy, store, parent=version - 1, base_model=base_model) == version
    store.record_metrics(1, 1, {"objective/kl": 0.5})


def test_prune_keeps_the_newest_the_serving_and_exported_versions(policy, store, store_dir, tiny_model_dir, tmp_path):
    five_versions(store_dir, policy, store, base_model=str(tiny_model_dir))
    export_adapter(2, tmp_path / "exported-v2", store=store, adapters_dir=store_dir.root)
    assert store.get_version(2).exported_at is not None
    assert store.rollback_to(3) == [4, 5]  # serving 3; 4 and 5 rolled back but among the newest
    assert VersionLifecycle(store, store_dir).prune(keep=2) == [1]
    assert store_dir.versions_on_disk() == [2, 3, 4, 5]
    pruned = store.get_version(1)
    assert pruned.pruned_at is not None and pruned.status == "published"  # the row stays
    assert [p.name for p in store.metrics(1)] == ["objective/kl"]  # and its metrics
    assert VersionLifecycle(store, store_dir).prune(keep=0) == []  # 0 keeps everything
    assert VersionLifecycle(store, store_dir).prune(keep=1) == [4]  # 5 newest, 3 serving, 2 exported


def test_rolling_back_to_a_pruned_version_is_refused_with_a_clear_message(policy, store, store_dir):
    five_versions(store_dir, policy, store)
    assert VersionLifecycle(store, store_dir).prune(keep=2) == [1, 2, 3]
    with pytest.raises(AdapterLoadError, match="version 2 was pruned .--keep-versions.: its files are gone"):
        VersionLifecycle(store, store_dir).roll_back(policy, 2)
    with pytest.raises(StoreError, match="Version 2 was pruned"):
        store.rollback_to(2)
    assert store.serving_version() == 5


def test_the_serving_version_is_never_pruned_even_when_old(policy, store, store_dir):
    five_versions(store_dir, policy, store)
    store.rollback_to(1)
    assert VersionLifecycle(store, store_dir).prune(keep=1) == [2, 3, 4]
    assert not store.mark_pruned(1)
    assert store_dir.versions_on_disk() == [1, 5]


def test_a_pruning_interrupted_before_the_folder_went_is_finished_by_the_next(policy, store, store_dir, monkeypatch):
    five_versions(store_dir, policy, store)
    assert store.mark_pruned(1)  # then a crash: the folder stays
    assert 1 in store_dir.versions_on_disk()
    VersionLifecycle(store, store_dir).prune(keep=10)
    assert 1 not in store_dir.versions_on_disk()


def test_keep_versions_is_an_option_of_the_worker():
    assert WorkerConfig().keep_versions == 20
    with pytest.raises(ValueError, match="--keep-versions"):
        WorkerConfig(keep_versions=-1).validate()
