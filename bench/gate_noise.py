"""How much one reading of the fluency gate (`FluencyGate.ratio`) varies: a finished run's version measured
again and again with fresh sampling seeds, on three sets of prompts; prints one JSON line last.

    python bench/gate_noise.py RUN_DIR VERSION [--readings 3] [--samples 32]

RUN_DIR is a `bench/learning_curve.py --out` folder, VERSION one of its published versions (0: the base).
The worker is built on a copy of its store, its base loaded in the run's dtype (`bench/replay_round.build_worker`);
each reading takes about `--samples` policy samples, as the gate takes `--fluency-samples` (32), on
(1) the pool prompts rated before VERSION (what its rounds trained on), (2) the other pool prompts, and
(3) the benchmark's held-out prompts, each prompt repeated to fill the samples. The base's own rate per
prompt is drawn once, as the gate draws it. Use it to see how wide the gate's readings of one version
spread against the margin between `--max-perplexity-ratio` and 1.
"""
from __future__ import annotations

import argparse
import json
import sqlite3
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.learning_curve import held_out_prompts  # noqa: E402
from bench.replay_round import measuring_options, worker_on_copy  # noqa: E402


def prompt_sets(db: Path, version: int) -> dict[str, list[str]]:
    """Return {"trained": prompts rated on versions before `version`, "other pool": the rest of the pool the
    worker draws from (active and admitted), "held-out": the benchmark's held-out prompts}."""
    with sqlite3.connect(db) as c:
        trained = [t for (t,) in c.execute(
            "SELECT text FROM prompts WHERE id IN (SELECT g.prompt_id FROM generations g JOIN ratings r "
            "ON r.generation_id = g.id WHERE g.adapter_version < ?) ORDER BY id", (version,))]
        pool = [t for (t,) in c.execute("SELECT text FROM prompts WHERE active AND admission = 'admitted' ORDER BY id")]
    return {"trained": trained, "other pool": [p for p in pool if p not in trained], "held-out": held_out_prompts()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("version", type=int)
    parser.add_argument("--readings", type=int, default=3)
    parser.add_argument("--samples", type=int, default=32)
    args = parser.parse_args(argv)
    import torch

    from ppo_feedback.adapters import AdapterState, apply_version
    from ppo_feedback.fluency import FluencyGate

    torch.set_num_threads(1)
    report = json.loads((args.run / "report.json").read_text())
    sets = {k: v for k, v in prompt_sets(args.run / "feedback.db", args.version).items() if v}
    readings = {}
    with worker_on_copy(args.run, report, measuring_options(args.run, report)) as (worker, _):
        gate = FluencyGate(worker.trainer)
        for prompts in sets.values():
            gate.base_rates(prompts)  # drawn from the base, before the version is applied
        if args.version:
            apply_version(worker.policy, args.run / "adapters", args.version,
                          initial=AdapterState.initial(worker.policy))
        for label, prompts in sets.items():
            rows = [p for p in prompts for _ in range(max(1, args.samples // len(prompts)))]
            readings[label] = []
            for i in range(args.readings):
                worker.trainer.iteration = 1000 + i  # a fresh sampling seed per reading
                readings[label].append(round(gate.ratio(rows), 3))
            print(f"v{args.version} {label} ({len(prompts)} prompts, {len(rows)} samples): {readings[label]}",
                  flush=True)
    print(json.dumps({"bench": "gate_noise", "run": str(args.run), "version": args.version,
                      "prompts": {k: len(v) for k, v in sets.items()}, "readings": readings}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
