"""The table of BENCHMARKS.md that bench/run_all.sh rewrites, and the machine line of its rows.

    python bench/_table.py machine
    python bench/_table.py update BENCHMARKS.md bench/out "<machine>" stage1=77 stage2=0 ...

`update` reads each benchmark's output (bench/out/<name>.txt) and its exit status. A benchmark that
exited 0 with a RESULT line gets a new row; one that was skipped (77: a resource is missing here)
or failed (any other status, or no RESULT line) keeps its previous row, and only the console says
what happened (its full output stays in bench/out/). Exits 1 when a benchmark failed.
"""
from __future__ import annotations

import datetime
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _result import SKIPPED, cpu_name, parse_result  # noqa: E402

START, END = "<!-- bench:start -->", "<!-- bench:end -->"
HEADER = "| benchmark | result | goal | met? | date | machine |\n|---|---|---|---|---|---|\n"
EMPTY = f"# Benchmarks\n\n{START}\n{END}\n"


@dataclass
class Outcome:
    """One benchmark's run: its name, exit status and printed output."""
    name: str
    status: int
    output: str


def machine() -> str:
    """'<cores> cores, <CPU>, <memory> GiB[, GPU <name>]'; a probe that fails leaves its part out."""
    parts = [f"{os.cpu_count() or '?'} cores", cpu_name()]
    try:
        parts.append(f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB")
    except (ValueError, OSError, AttributeError):
        pass
    if shutil.which("nvidia-smi"):
        try:
            gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                 text=True, timeout=20).stdout.strip().splitlines()
            if gpu:
                parts.append(f"GPU {gpu[0].strip()}")
        except (OSError, subprocess.SubprocessError):
            pass
    return ", ".join(parts)


def number(value) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def row(fields: dict, date: str, where: str) -> str:
    """The table row of one RESULT line's fields."""
    met = {True: "yes", False: "**no**", None: "-"}[fields.get("met")]
    result = f"{number(fields.get('value'))} {fields.get('unit', '')}".strip()
    cells = [fields["name"], result, fields.get("goal") or "none (measured)", met, date, where]
    return "| " + " | ".join(cell(text) for text in cells) + " |"


def rows_of(text: str) -> dict[str, str]:
    """The table's rows by benchmark name (empty when the table is absent)."""
    found = re.search(re.escape(START) + r"\n(.*?)" + re.escape(END), text, re.S)
    table = {}
    for line in (found.group(1) if found else "").splitlines():
        if line.startswith("| ") and not line.startswith(("| benchmark ", "|---")):
            table[line[2:].split(" | ", 1)[0].strip()] = line
    return table


def merge(text: str, new_rows: dict[str, str]) -> str:
    """`text` with its table holding the old rows, each replaced by a new row of the same benchmark."""
    table = {**rows_of(text), **new_rows}
    block = START + "\n" + HEADER + "".join(table[key] + "\n" for key in sorted(table)) + END
    found = re.search(re.escape(START) + r"\n.*?" + re.escape(END), text, re.S)
    if found:
        return text[:found.start()] + block + text[found.end():]
    return text.rstrip("\n") + "\n\n" + block + "\n"


def judge(outcomes: list[Outcome], date: str, where: str) -> tuple[dict[str, str], list[str], bool]:
    """(new rows of the benchmarks that ran, a console line per benchmark, whether any failed)."""
    rows, lines, failed = {}, [], False
    for outcome in outcomes:
        fields = parse_result(outcome.output)
        if outcome.status == 0 and fields is not None and fields.get("value") is not None:
            fields.setdefault("name", outcome.name)
            rows[outcome.name] = row(fields, date, where)
            lines.append(f"{outcome.name}: {rows[outcome.name]}")
        elif outcome.status == 0 and fields is not None:
            lines.append(f"{outcome.name}: ran, but printed no value; its previous row is kept")
        elif outcome.status == SKIPPED:
            reason = (fields or {}).get("skipped", "a resource is missing")
            lines.append(f"{outcome.name}: SKIPPED ({reason}); its previous row is kept")
        else:
            failed = True
            why = (fields or {}).get("error") or ("no RESULT line" if fields is None else "no value")
            lines.append(f"{outcome.name}: FAILED (exit {outcome.status}: {why}); its previous row is kept, "
                         f"the output is in bench/out/{outcome.name}.txt")
    return rows, lines, failed


def update(path: Path, outcomes: list[Outcome], where: str, date: str | None = None) -> tuple[list[str], bool]:
    """Rewrite the table in `path` from `outcomes`; (console lines, whether any benchmark failed)."""
    date = date or datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    rows, lines, failed = judge(outcomes, date, where)
    if rows:
        text = path.read_text() if path.exists() else EMPTY
        path.write_text(merge(text, rows))
    return lines, failed


def main(argv: list[str]) -> int:
    if argv[:1] == ["machine"]:
        print(machine())
        return 0
    if len(argv) >= 4 and argv[0] == "update":
        path, out, where = Path(argv[1]), Path(argv[2]), argv[3]
        outcomes = []
        for item in argv[4:]:
            name, _, status = item.partition("=")
            log = out / f"{name}.txt"
            outcomes.append(Outcome(name, int(status), log.read_text(errors="replace") if log.exists() else ""))
        lines, failed = update(path, outcomes, where)
        print("\n".join(lines), file=sys.stderr)
        return 1 if failed else 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
