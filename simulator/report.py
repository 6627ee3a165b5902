"""What a room's run did: per-version summaries with t intervals, the CSV and plot, latencies, and the
exactly-once check against the store.
"""
from __future__ import annotations

import csv
import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from scipy.stats import t as student_t

from .room import ENDPOINTS, RatingRecord, SimulationResult

CSV_COLUMNS = ["time_s", "ratings_so_far", "rater", "prompt_id", "generation_id", "version", "taste", "score",
               "best"]


def percentile(values: Sequence[float], q: float) -> float | None:
    """Return the q-th percentile (0..100) by linear interpolation; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def t_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """Return (mean, half-width of the two-sided Student t confidence interval); half-width nan below two values."""
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    mean = statistics.fmean(values)
    if n < 2:
        return mean, float("nan")
    return mean, float(student_t.ppf(0.5 + confidence / 2, n - 1)) * statistics.stdev(values) / math.sqrt(n)


def version_summary(records: Iterable[RatingRecord]) -> list[dict[str, Any]]:
    """Return per version (in order): ratings, mean taste ± 95% CI, mean score, and the ratings given so far
    when its first and last rating came in."""
    by_version: dict[int, list[RatingRecord]] = defaultdict(list)
    for r in sorted(records, key=lambda r: r.ratings_so_far):
        by_version[r.version].append(r)
    rows = []
    for version in sorted(by_version):
        rs = by_version[version]
        mean, half = t_interval([r.taste for r in rs])
        rows.append({"version": version, "n_ratings": len(rs), "mean_taste": mean, "ci95": half,
                     "mean_score": statistics.fmean(r.score for r in rs),
                     "first_at": rs[0].ratings_so_far, "ratings_so_far": rs[-1].ratings_so_far})
    return rows


def format_summary(rows: Sequence[dict[str, Any]]) -> str:
    """Return the per-version table as text."""
    lines = ["version  ratings so far  ratings  mean taste (95% CI)   mean score"]
    for r in rows:
        ci = "" if math.isnan(r["ci95"]) else f" ± {r['ci95']:.3f}"
        lines.append(f"{r['version']:>7}  {r['ratings_so_far']:>14}  {r['n_ratings']:>7}  "
                     f"{r['mean_taste']:.3f}{ci:<10}        {r['mean_score']:.2f}")
    return "\n".join(lines)


def write_csv(records: Sequence[RatingRecord], path: str | Path) -> Path:
    """Write one row per rating (CSV_COLUMNS), in the order ratings were accepted; return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for r in sorted(records, key=lambda r: r.ratings_so_far):
            row = asdict(r)
            row["time_s"], row["taste"] = round(r.time_s, 3), round(r.taste, 4)
            writer.writerow({k: row[k] for k in CSV_COLUMNS})
    return path


def write_plot(records: Sequence[RatingRecord], path: str | Path, title: str = "", window: int = 20) -> Path:
    """Plot taste against ratings given: each rating, a moving mean, and each version's mean; return the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ordered = sorted(records, key=lambda r: r.ratings_so_far)
    xs = [r.ratings_so_far for r in ordered]
    ys = [r.taste for r in ordered]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    ax.scatter(xs, ys, s=8, alpha=0.25, color="grey", label="rated generation")
    if ordered:
        w = max(1, min(window, len(ys)))
        moving = [statistics.fmean(ys[max(0, i - w + 1):i + 1]) for i in range(len(ys))]
        ax.plot(xs, moving, color="tab:blue", label=f"moving mean ({w} ratings)")
    for row in version_summary(ordered):
        ax.hlines(row["mean_taste"], row["first_at"], max(row["ratings_so_far"], row["first_at"] + 1),
                  color="tab:red", linewidth=2.5)
        ax.annotate(f"v{row['version']}", (row["first_at"], row["mean_taste"]), textcoords="offset points",
                    xytext=(0, 5), fontsize=8, color="tab:red")
    ax.plot([], [], color="tab:red", linewidth=2.5, label="mean per version")
    ax.set_xlabel("ratings given")
    ax.set_ylabel("preference score (taste, 0..1)")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title(title or "Simulated raters: preference score of rated generations")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def check_exactly_once(store, accepted: dict[tuple[int, str], int], generation_ids: Iterable[int],
                       raters: Iterable[str]) -> dict[str, Any]:
    """Compare what clients saw accepted with the store (read with `db.FeedbackStore`, checker only).

    For every generation this run received, read its rating history; a (generation, rater) pair
    of our raters must have exactly one rating row, current, with the score the client sent, and
    exactly the accepted pairs may have any. Returns counts and up to 10 examples of each problem.
    """
    raters = set(raters)
    rows: dict[tuple[int, str], list] = defaultdict(list)
    for gid in sorted(set(generation_ids)):
        for rating in store.rating_history(gid):
            if rating.rater in raters:
                rows[(gid, rating.rater)].append(rating)
    missing = [k for k in accepted if k not in rows]
    unexpected = [k for k in rows if k not in accepted]
    duplicated = [k for k, rs in rows.items() if len(rs) != 1]
    wrong = [k for k, rs in rows.items() if k in accepted and not any(r.current and r.score == accepted[k]
                                                                       for r in rs)]
    ok = not (missing or unexpected or duplicated or wrong)
    return {"ok": ok, "accepted": len(accepted), "stored": sum(len(rs) for rs in rows.values()),
            "missing": len(missing), "unexpected": len(unexpected), "duplicated": len(duplicated),
            "wrong_score": len(wrong),
            "examples": {"missing": missing[:10], "unexpected": unexpected[:10], "duplicated": duplicated[:10],
                         "wrong_score": wrong[:10]}}



def latency_report(result: SimulationResult, endpoints: Sequence[str] = ENDPOINTS) -> dict[str, Any]:
    """Return per endpoint: calls, errors, and p50/p95/p99 latency in milliseconds of the successful calls."""
    report = {}
    for endpoint in endpoints:
        calls = [c for c in result.calls if c.endpoint == endpoint]
        if not calls:
            continue
        ok = [c.latency_s * 1000 for c in calls if c.ok]
        report[endpoint] = {"calls": len(calls), "errors": len(calls) - len(ok),
                            **{f"p{q}_ms": None if not ok else round(percentile(ok, q), 1) for q in (50, 95, 99)}}
    return report
