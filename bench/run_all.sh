#!/usr/bin/env bash
# Run every benchmark in bench/ and rewrite the generated table in BENCHMARKS.md.
#   bash bench/run_all.sh            # all of them (about two hours on 2 CPU cores: real_music ~50 min, token_memory ~15)
#   bash bench/run_all.sh stage5     # only bench/bench_stage5.py (gpu_check: only bench/gpu_check.py)
# Each benchmark prints its figures and, last, one line `RESULT {json}` (bench/_result.py). Its full
# output goes to bench/out/<name>.txt. A benchmark that ran gets a new row in BENCHMARKS.md; one that
# was skipped (exit 77: sox, a song package, the codec weights or a GPU is missing here) or failed
# keeps its previous row: only this console and bench/out/ say what happened (bench/_table.py).
# Runs on Linux and macOS; exits 1 when a benchmark failed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3}"
mkdir -p bench/out
filter="${1:-}"
machine="$("$PYTHON" bench/_table.py machine 2>/dev/null || true)"
machine="${machine:-unknown machine}"
outcomes=()
for script in bench/bench_*.py bench/gpu_check.py; do
  [[ -f "$script" ]] || continue
  name="$(basename "$script" .py)"; name="${name#bench_}"
  [[ -n "$filter" && "$name" != "$filter" ]] && continue
  echo "=== $script" >&2
  started=$(date +%s)
  set +e
  "$PYTHON" "$script" 2>&1 | tee "bench/out/$name.txt" >&2
  status=${PIPESTATUS[0]}
  set -e
  echo "=== $script: exit $status after $(( $(date +%s) - started )) s" >&2
  outcomes+=("$name=$status")
done
[[ ${#outcomes[@]} -gt 0 ]] || { echo "no benchmark matched '$filter'" >&2; exit 2; }
"$PYTHON" bench/_table.py update BENCHMARKS.md bench/out "$machine" "${outcomes[@]}"
