"""Simulated raters: drive a running app through its public API as K concurrent scripted raters.

Usage: python -m simulator --url http://127.0.0.1:7860/ --raters 4 --ratings 200 \\
           --preference keyword:happy [--noise 0.5] [--bias 0.5] [--seed 0] [--pace 40]

Each rater asks `/next_prompt`, `/generate`s candidates, `/rate`s every one 1..5 and `/prefer`s
its best over the ones of lower taste (when one stands out), until `--ratings` ratings are in (or
`--duration` seconds passed). Nothing internal is touched: only `gradio_client` calls, so the page must run without
logins (each rater acts under its own name through the endpoints' `rater` argument).

A rater's taste is a pure function of the response text with values in [0, 1] (`--preference`):

    keyword:WORD    1 when the word appears (whole word, any case), else 0
    length:TARGET   1 - |words - TARGET| / TARGET, clipped to [0, 1]
    sentiment       0.5 + (positive - negative opinion words) / 6, clipped (simulator.lexicon)
    regex:PATTERN   1 when re.search(PATTERN, text) matches, else 0

and its score is `round(1 + 4 * taste + bias + noise)` clipped to 1..5, where `bias` is the
rater's own offset (`--bias B` spreads the raters evenly over [-B, +B], so a per-rater
normalisation has something to correct) and `noise` is Gaussian with sd `--noise`.

`--pace N` makes the room wait after every N ratings until the worker has published a version
trained on them (or `--pace-timeout` passed), so that a small rating budget is spread over many
versions; `--pace-lag 2` lets the room rate the next block while the worker trains on the last
(both cores busy). The worker needs `--min-new-feedback` at most one block's feedback (N ratings
plus the preferences). Without `--pace` raters rate as fast as the app answers.

Prints per adapter version the mean taste of its rated generations (± a 95% t interval) and the
ratings given so far; writes one CSV row per rating (`--csv`) and a PNG of taste against ratings
given (`--plot`, needs matplotlib).
"""
from __future__ import annotations

import argparse
import json
import math
import sys

from .raters import parse_preference
from .report import format_summary, latency_report, version_summary, write_csv, write_plot
from .room import Simulation


def build_parser() -> argparse.ArgumentParser:
    """Return the simulator's command-line parser."""
    parser = argparse.ArgumentParser(prog="python -m simulator", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    parser.add_argument("--url", default="http://127.0.0.1:7860/", help="the running app (default %(default)s)")
    parser.add_argument("--raters", type=int, default=4, help="concurrent simulated raters (default %(default)s)")
    parser.add_argument("--ratings", type=int, default=None,
                        help="stop after this many ratings (default 100 unless --duration is given)")
    parser.add_argument("--duration", type=float, default=None, help="stop after this many seconds")
    parser.add_argument("--preference", default="sentiment",
                        help="keyword:WORD, length:TARGET, sentiment or regex:PATTERN (default %(default)s)")
    parser.add_argument("--noise", type=float, default=0.5, help="sd of the Gaussian noise on scores (default %(default)s)")
    parser.add_argument("--bias", type=float, default=0.5,
                        help="per-rater offsets spread over [-B, +B] (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the raters' noise (default %(default)s)")
    parser.add_argument("--candidates", type=int, default=4, help="candidates per prompt (default %(default)s)")
    parser.add_argument("--pace", type=int, default=None,
                        help="after every N ratings wait for the worker to publish a version trained on them")
    parser.add_argument("--pace-lag", type=int, default=1,
                        help="blocks the room may run ahead of training: 1 waits for each block's version, 2 "
                             "rates the next block while the worker trains on the last (default %(default)s)")
    parser.add_argument("--pace-timeout", type=float, default=600.0,
                        help="longest wait for the worker per --pace block, seconds (default %(default)s)")
    parser.add_argument("--no-prefer", dest="prefer", action="store_false", help="rate only, never /prefer")
    parser.add_argument("--rater-prefix", default="sim", help="raters are named PREFIX-01, PREFIX-02, ...")
    parser.add_argument("--csv", default="simulate.csv", help="one row per rating (default %(default)s)")
    parser.add_argument("--plot", default="simulate.png", help="PNG of taste vs ratings given; '' for none")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the room as the command line says and print its summary; return 0, 1 when calls failed, 2 on a bad option."""
    args = build_parser().parse_args(argv)
    try:
        preference = parse_preference(args.preference)
        ratings = 100 if args.ratings is None and args.duration is None else args.ratings
        sim = Simulation(args.url, preference, raters=args.raters, ratings=ratings, duration=args.duration,
                         candidates=args.candidates, noise=args.noise, bias=args.bias, seed=args.seed,
                         rater_prefix=args.rater_prefix, pace=args.pace, pace_lag=args.pace_lag,
                         pace_timeout=args.pace_timeout,
                         prefer=args.prefer)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result = sim.run()
    rows = version_summary(result.records)
    print(format_summary(rows))
    write_csv(result.records, args.csv)
    if args.plot:
        try:
            write_plot(result.records, args.plot, title=f"Simulated raters, preference {args.preference}")
        except ImportError:
            print("no plot: matplotlib is not installed (pip install matplotlib)", file=sys.stderr)
            args.plot = ""
    summary = {"preference": args.preference, "ratings": len(result.records), "preferences": result.preferences,
               "wall_s": round(result.wall_s, 1), "errors": len(result.errors),
               "error_messages": sorted({f"{c.endpoint}: {c.error}" for c in result.errors})[:10],
               "versions": [{k: (None if isinstance(v, float) and math.isnan(v) else
                                 round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in rows],
               "latency": latency_report(result), "csv": args.csv, "plot": args.plot or None}
    print(json.dumps(summary))
    for failure in result.failures:
        print(failure, file=sys.stderr)
    return 0 if not (result.errors or result.failures) else 1


if __name__ == "__main__":
    sys.exit(main())
