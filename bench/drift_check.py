"""The worker's own drift measures (`DirectTrainer.drift`: KL and perplexity ratio; the fluency gate's
`FluencyGate.ratio`) of finished runs' newest versions, beside the held-out figures `bench/learning_curve.py`
reported for them; prints one JSON line last.

    python bench/drift_check.py RUN_DIR [RUN_DIR ...] [--batches 4]

Each RUN_DIR is a `bench/learning_curve.py --out` folder. The worker is built on a copy of the first run's
store (its model and dtype, `--max-new-tokens 24` as the bench samples); the base model (adapter off) is measured first,
then each run's newest version, `--batches` times on 8 pool prompts each, as a round measures itself, and as
many times on `--fluency-samples` (32) pool prompts as the gate measures a version. Use it to see how a bound
on the worker's measures (`--direct-max-perplexity-ratio`, `--max-perplexity-ratio`) maps to held-out
fluency.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.replay_round import measuring_options, worker_on_copy  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--batches", type=int, default=4)
    args = parser.parse_args(argv)
    import torch

    from ppo_feedback.adapters import AdapterState, apply_version
    from ppo_feedback.fluency import FluencyGate

    torch.set_num_threads(1)
    first = json.loads((args.runs[0] / "report.json").read_text())
    rows = []
    with worker_on_copy(args.runs[0], first, measuring_options(args.runs[0], first)) as (worker, _):
        initial = AdapterState.initial(worker.policy)
        gate = FluencyGate(worker.trainer)  # one for every run: the base's references are drawn once
        for run in [None, *args.runs]:
            report = None if run is None else json.loads((run / "report.json").read_text())
            if report is not None:
                apply_version(worker.policy, run / "adapters", report["versions_published"][-1], initial=initial)
            drifts, gated = [], []
            for i in range(args.batches):
                worker.trainer.iteration = i  # a fresh sampling seed per batch, as successive checks have
                drifts.append(worker.direct.drift(worker.pick_prompts()))
                gated.append(gate.ratio(worker.pick_prompts(worker.config.fluency_samples)))
            row = {"run": "base" if run is None else str(run),
                   "perplexity_ratio": [round(d.perplexity_ratio, 3) for d in drifts],
                   "text_perplexity_ratio": [round(r, 3) for r in gated],
                   "kl": [round(d.kl, 2) for d in drifts],
                   "held_out_perplexity_ratio": None if report is None else report["held_out"]["perplexity_ratio"],
                   "held_out_kl": None if report is None else report["held_out"]["kl_newest"]["mean"]}
            print(row, flush=True)
            rows.append(row)
    print(json.dumps({"bench": "drift_check", "batches": args.batches, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
