#!/usr/bin/env bash
# The TRL anchor (../shared/bench/trl_ppo_anchor.py) with bf16=True, TRL's mixed precision, to set
# beside `python bench/ppo_iteration.py 3 --dtype bfloat16` like for like. Prints one JSON line.
# Usage: bash bench/trl_anchor_bf16.sh [ITERATIONS]   (installs the anchor's venv on first use)
set -euo pipefail
shared=${SHARED_BENCH:-$(cd "$(dirname "$0")/../../shared/bench" && pwd)}
root=${TRL_ANCHOR_DIR:-/tmp/trl-anchor}
[ -x "$root/venv/bin/python" ] && [ -f "$root/models/gpt2-shaped/config.json" ] \
  || bash "$shared/run_trl_anchor.sh" 1 >/dev/null
script=$(mktemp --suffix=.py)
trap 'rm -f "$script"' EXIT
sed -e 's/bf16=False/bf16=True/' -e 's/"trl-0.29.1 PPOTrainer"/"trl-0.29.1 PPOTrainer bf16"/' \
  "$shared/trl_ppo_anchor.py" > "$script"
grep -q 'bf16=True' "$script" || { echo "the anchor no longer sets bf16=False; update this script" >&2; exit 1; }
"$root/venv/bin/python" "$script" "$root/models/gpt2-shaped" "${1:-3}" 2>/dev/null | tail -1
