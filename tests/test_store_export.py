"""JSONL export for other RLHF tools, loaded back with `datasets`; the `python -m db` command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from db import FeedbackStore, NewGeneration
from db.export import export_jsonl
from store_fixtures import store, store_url  # noqa: F401  (fixtures)

REPO = Path(__file__).resolve().parents[1]
EMOJI_PROMPT = "Say hi 👋 <b>politely</b>"


@pytest.fixture
def rated(store: FeedbackStore) -> FeedbackStore:
    """Two prompts; ratings by two raters (one changed) and one explicit preference."""
    hi = store.add_prompt(EMOJI_PROMPT)
    hi_a, hi_b, hi_c = (
        g.id
        for g in store.record_generations(
            hi, 0, [NewGeneration(t) for t in ("Hello! 😊", "'; DROP TABLE x; --", "Hey")]
        )
    )
    bye = store.add_prompt("Say bye")
    bye_a, bye_b = (
        g.id for g in store.record_generations(bye, 0, [NewGeneration("Bye"), NewGeneration("Ciao")])
    )
    store.rate(hi_a, "alice", 1)
    store.rate(hi_a, "alice", 5, "lovely")  # replaces the 1
    store.rate(hi_b, "alice", 1)
    store.rate(hi_c, "bob", 4)
    store.rate(hi_c, "alice", 2)  # hi_c's mean is 3
    store.rate(bye_a, "bob", 3)
    store.rate(bye_b, "bob", 3)  # equal: no pair
    store.prefer(bye_b, bye_a, "carol")
    return store


def _load(path: Path, tmp_path: Path) -> list[dict]:
    import datasets

    dataset = datasets.load_dataset(
        "json", data_files=str(path), split="train", cache_dir=str(tmp_path / "hf-cache")
    )
    return dataset.to_list()


def test_preference_export(rated: FeedbackStore, tmp_path: Path) -> None:
    path = tmp_path / "preference.jsonl"
    assert export_jsonl(rated, "preference", path) == 4
    rows = _load(path, tmp_path)
    assert rows == [
        {"prompt": "Say bye", "chosen": "Ciao", "rejected": "Bye"},
        {"prompt": EMOJI_PROMPT, "chosen": "Hello! 😊", "rejected": "'; DROP TABLE x; --"},
        {"prompt": EMOJI_PROMPT, "chosen": "Hello! 😊", "rejected": "Hey"},
        {"prompt": EMOJI_PROMPT, "chosen": "Hey", "rejected": "'; DROP TABLE x; --"},
    ]


def test_unpaired_export(rated: FeedbackStore, tmp_path: Path) -> None:
    path = tmp_path / "unpaired.jsonl"
    assert export_jsonl(rated, "unpaired", path) == 6
    rows = _load(path, tmp_path)
    assert [(r["completion"], r["label"]) for r in rows] == [
        ("Hello! 😊", True),
        ("'; DROP TABLE x; --", False),
        ("Hey", True),
        ("Hey", False),
        ("Bye", False),
        ("Ciao", False),
    ]
    assert set(rows[0]) == {"prompt", "completion", "label"}


def test_ratings_export(rated: FeedbackStore, tmp_path: Path) -> None:
    path = tmp_path / "ratings.jsonl"
    assert export_jsonl(rated, "ratings", path) == 6
    rows = _load(path, tmp_path)
    assert set(rows[0]) == {
        "rating_id",
        "prompt_id",
        "prompt",
        "page_id",
        "generation_id",
        "completion",
        "score",
        "comment",
        "rater",
        "adapter_version",
        "created_at",
    }
    lovely = rows[0]
    assert (lovely["prompt"], lovely["completion"], lovely["score"], lovely["comment"], lovely["rater"]) == (
        EMOJI_PROMPT,
        "Hello! 😊",
        5,
        "lovely",
        "alice",
    )
    assert lovely["adapter_version"] == 0 and lovely["created_at"].endswith("+00:00")
    assert sorted(r["score"] for r in rows) == [1, 2, 3, 3, 4, 5]
    pages = {r["generation_id"]: r["page_id"] for r in rows}
    assert pages == {g.id: g.page_id for g in (rated.get_generation(i) for i in pages)}
    assert len(set(pages.values())) == 2  # one page per prompt here: each was one request


def test_rating_pairs_come_from_one_page(store: FeedbackStore, tmp_path: Path) -> None:
    prompt = store.add_prompt("Same prompt, two raters")
    ana = store.record_generations(
        prompt, 0, [NewGeneration("ana good"), NewGeneration("ana bad")], rater="ana"
    )
    [ben] = store.record_generations(prompt, 0, [NewGeneration("ben middling")], rater="ben")
    for generation, rater, score in ((ana[0], "ana", 5), (ana[1], "ana", 1), (ben, "ben", 3)):
        store.rate(generation.id, rater, score)
    path = tmp_path / "preference.jsonl"
    assert export_jsonl(store, "preference", path) == 1  # ben's candidate was never beside ana's
    assert _load(path, tmp_path) == [
        {"prompt": "Same prompt, two raters", "chosen": "ana good", "rejected": "ana bad"}
    ]


def _python_m_db(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    return subprocess.run(
        [sys.executable, "-m", "db", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def test_command_line_from_another_directory(rated: FeedbackStore, store_url: str, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = _python_m_db(
        "export", "--db", store_url, "--format", "unpaired", "--out", "out/kto.jsonl", cwd=elsewhere
    )
    assert result.returncode == 0, result.stderr
    assert "wrote 6 unpaired rows" in result.stderr
    lines = (elsewhere / "out" / "kto.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 6 and json.loads(lines[0])["completion"] == "Hello! 😊"

    fresh = tmp_path / "new" / "feedback.db"
    result = _python_m_db("upgrade", "--db", str(fresh), cwd=elsewhere)
    assert result.returncode == 0, result.stderr
    assert "revision 0004" in result.stderr and fresh.exists()
