#!/usr/bin/env bash
# Run every benchmark in bench/ and rewrite the generated table in BENCHMARKS.md.
#   bash bench/run_all.sh            # all of them (tens of minutes on 2 CPU cores)
#   bash bench/run_all.sh stage5     # only bench/bench_stage5.py
# Each benchmark prints its figures and, last, the ratio against the reference way; the full
# output goes to bench/out/<name>.txt and its last lines into BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3}"
mkdir -p bench/out
filter="${1:-}"
machine="$(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(free -g | awk '/Mem:/{print $2}') GiB"
if command -v nvidia-smi >/dev/null 2>&1; then
  machine="$machine, GPU $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)"
fi
rows=""
for script in bench/bench_*.py; do
  name="$(basename "$script" .py)"; name="${name#bench_}"
  [[ -n "$filter" && "$name" != "$filter" ]] && continue
  echo "=== $script" >&2
  started=$(date +%s)
  if "$PYTHON" "$script" 2>&1 | tee "bench/out/$name.txt" >&2; then status=ok; else status=FAILED; fi
  last="$(grep -v '^\s*$' "bench/out/$name.txt" | tail -n 1 | sed 's/|/\\|/g')"
  rows+="| $name | $last | $status, $(( $(date +%s) - started )) s | $(date -u +%Y-%m-%d) | $machine |"$'\n'
done
[[ -n "$rows" ]] || { echo "no benchmark matched '$filter'" >&2; exit 2; }
"$PYTHON" - "$rows" <<'PY'
import re, sys
from pathlib import Path
path = Path("BENCHMARKS.md")
text = path.read_text() if path.exists() else "# Benchmarks\n\n<!-- bench:start -->\n<!-- bench:end -->\n"
start, end = "<!-- bench:start -->", "<!-- bench:end -->"
old = re.search(re.escape(start) + r"\n(.*?)" + re.escape(end), text, re.S)
table = {}
for line in (old.group(1) if old else "").splitlines() + sys.argv[1].splitlines():
    cells = line.split(" | ")
    if line.startswith("| ") and not line.startswith(("| benchmark", "|---")):
        table[cells[0]] = line  # a new row replaces the old row of the same benchmark
header = "| benchmark | last line (the ratio) | status, wall time | date | machine |\n|---|---|---|---|---|\n"
block = start + "\n" + header + "\n".join(table[key] for key in sorted(table)) + "\n" + end
text = text.replace(old.group(0), block) if old else text + "\n" + block + "\n"
path.write_text(text)
PY
echo "BENCHMARKS.md updated" >&2
