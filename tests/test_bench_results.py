"""The benchmarks' shared ending (bench/_result.py) and run_all.sh's table (bench/_table.py), without
running a real benchmark: every bench/*.py ends through `_result.finish`, a skipped (77) or failed
benchmark keeps its previous row of BENCHMARKS.md, and run_all.sh itself does so end to end."""
from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))
import _result  # noqa: E402
import _table  # noqa: E402

BENCHMARKS = sorted(path for path in BENCH.glob("*.py") if not path.name.startswith("_"))
OLD_TABLE = textwrap.dedent("""\
    # Benchmarks

    Words before the table.

    <!-- bench:start -->
    | benchmark | result | goal | met? | date | machine |
    |---|---|---|---|---|---|
    | skipper | 0.72 x sox | none (measured) | - | 2026-11-25 | old machine |
    | failer | 26.3 x | >= 50 | **no** | 2026-11-26 | old machine |
    | runner | 1.00 x | none (measured) | - | 2026-11-25 | old machine |
    <!-- bench:end -->

    ## Words after the table
    """)


def test_there_are_benchmarks():
    assert {path.stem for path in BENCHMARKS} >= {"bench_stage1", "bench_stage5", "gpu_check"}


@pytest.mark.parametrize("path", BENCHMARKS, ids=lambda path: path.name)
def test_every_benchmark_ends_through_the_shared_helper(path):
    """It imports `finish` from bench/_result.py, its `__main__` block calls it, and it never writes a
    RESULT line or exits with 77 by itself (no copied logic)."""
    tree = ast.parse(path.read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module == "_result"
                for alias in node.names}
    assert "finish" in imported, f"{path.name} does not import finish from _result"
    main_blocks = [node for node in tree.body if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test)]
    assert main_blocks and "finish(" in ast.unparse(main_blocks[0]), f"{path.name}: __main__ does not call finish"
    strings = [node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)]
    assert not [text for text in strings if text.startswith("RESULT")], f"{path.name} prints its own RESULT line"
    assert 77 not in [node.value for node in ast.walk(tree) if isinstance(node, ast.Constant)], path.name


def test_every_benchmark_imports(tmp_path):
    """Each benchmark's module loads against today's package (one renamed constant once broke one unseen):
    all of them imported in one fresh interpreter, none of their mains run."""
    names = [path.stem for path in BENCHMARKS]
    code = (f"import importlib, sys; sys.path.insert(0, {str(BENCH)!r}); "
            f"[importlib.import_module(name) for name in {names!r}]; print('imported', len({names!r}))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"imported {len(names)}" in result.stdout


@pytest.mark.parametrize("path", BENCHMARKS, ids=lambda path: path.name)
def test_every_benchmark_imports_its_result_helper_before_torch_or_numpy(path):
    """`_result`'s SIGTERM handler prints the RESULT line of a benchmark stopped while it imports: it must be
    in place before the slow imports (torch alone takes seconds)."""
    tree = ast.parse(path.read_text())
    lines = {}
    for node in tree.body:
        names = ([node.module] if isinstance(node, ast.ImportFrom) else
                 [alias.name for alias in node.names] if isinstance(node, ast.Import) else [])
        for name in names:
            lines.setdefault(name.split(".")[0], node.lineno)
    heavy = [lines[name] for name in ("torch", "numpy", "pipeline", "soundfile", "soxr") if name in lines]
    assert not heavy or lines["_result"] < min(heavy), f"{path.name} imports _result after a slow import"


def terminate_and_read_result(process: subprocess.Popen) -> dict:
    """SIGTERM a running benchmark -> the fields of its last output line, which must be its RESULT line
    (and its exit status 130)."""
    import signal

    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=30)
    lines = [line for line in output.splitlines() if line.strip()]
    assert process.returncode == 130, output[-2000:]
    return _result.parse_result(lines[-1])


def run_finish(main, capsys, **kwargs) -> tuple[int, list[str]]:
    """`finish` in this process: its immediate exit (os._exit) replaced by sys.exit, so pytest survives it."""
    with pytest.MonkeyPatch.context() as patch, pytest.raises(SystemExit) as stop:
        patch.setattr(_result, "LEAVE", sys.exit)
        _result.finish(main, **kwargs)
    return stop.value.code, capsys.readouterr().out.strip().splitlines()


def test_finish_prints_the_result_line_last(capsys):
    def main():
        print("a human-readable line")
        return {"value": 61.5, "extra": [1, 2]}

    code, lines = run_finish(main, capsys, name="demo", unit="x", goal=">= 50")
    assert code == 0 and lines[0] == "a human-readable line"
    assert _result.parse_result(lines[-1]) == {"name": "demo", "value": 61.5, "unit": "x", "goal": ">= 50",
                                               "met": True, "extra": [1, 2]}
    assert lines[-1].startswith("RESULT {") and json.loads(lines[-1][len("RESULT "):])["met"] is True


def test_finish_skips_with_77_when_a_resource_is_missing(capsys):
    def main():
        _result.require_command("no-such-command-here", "apt-get install it")

    code, lines = run_finish(main, capsys, name="demo", unit="x", goal="<= 1.3")
    fields = _result.parse_result(lines[-1])
    assert code == _result.SKIPPED == 77
    assert fields["value"] is None and fields["met"] is None and "no-such-command-here" in fields["skipped"]
    assert any(line.startswith("skipped: ") for line in lines[:-1])  # the reason, before the RESULT line


def test_finish_reports_a_failure_with_exit_1(capsys):
    def main():
        raise ValueError("broken\nsecond line")

    code, lines = run_finish(main, capsys, name="demo", unit="x")
    fields = _result.parse_result(lines[-1])
    assert code == 1 and fields["error"] == "ValueError: broken" and fields["value"] is None


def test_a_benchmark_stopped_by_sigterm_still_ends_with_its_result_line(tmp_path):
    """What a time limit (`timeout`, a CI runner) does to a long benchmark: SIGTERM mid-run."""
    import time

    script = tmp_path / "bench_long.py"
    script.write_text(f"import sys, time\nsys.path.insert(0, {str(BENCH)!r})\nfrom _result import finish\n\n"
                      "def main():\n    print('started', flush=True)\n    time.sleep(60)\n\n"
                      "finish(main, name='long', unit='s', goal='<= 1')\n")
    process = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "started"
    time.sleep(0.2)
    fields = terminate_and_read_result(process)
    assert fields["name"] == "long" and fields["value"] is None and "SIGTERM" in fields["error"]


def test_require_command_follows_an_environment_override(monkeypatch):
    monkeypatch.setenv("DEMO_TOOL", "/nonexistent/sox")
    with pytest.raises(_result.Missing, match="/nonexistent/sox"):
        _result.require_command("sh", "install it", env="DEMO_TOOL")
    monkeypatch.delenv("DEMO_TOOL")
    assert _result.require_command("sh", "install it", env="DEMO_TOOL").endswith("sh")


def test_goals_are_judged_and_a_missing_value_is_not():
    assert _result.met(8.9, "<= 9") is True and _result.met(9.1, "<= 9") is False
    assert _result.met(50, ">= 50") is True and _result.met(1.0, "< 1") is False and _result.met(2, "> 1") is True
    assert _result.met(None, "<= 9") is None and _result.met(1.0, None) is None
    assert _result.met(float("nan"), "<= 9") is None
    assert '"value": null' in _result.result_line("n", float("nan"), "u")  # still valid JSON
    with pytest.raises(ValueError):
        _result.met(1.0, "about 9")


def outcome(name: str, status: int, value=None, **extra) -> _table.Outcome:
    fields = {"value": value, "unit": "x", "goal": None, **extra}
    return _table.Outcome(name, status, f"figures\n{_result.result_line(name, **fields)}\n")


def test_a_skipped_or_failed_benchmark_keeps_its_previous_row(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    path.write_text(OLD_TABLE)
    old_rows = _table.rows_of(OLD_TABLE)
    outcomes = [outcome("skipper", 77, skipped="sox is not installed"),
                outcome("failer", 1, error="RuntimeError: boom"),
                _table.Outcome("runner", 0, "Traceback ...\nno result line at all\n"),  # exit 0 but no RESULT
                outcome("newcomer", 0, 3.25, goal="<= 4")]
    lines, failed = _table.update(path, outcomes, "this machine", date="2026-12-01")
    text = path.read_text()
    rows = _table.rows_of(text)
    assert failed
    for name in ("skipper", "failer", "runner"):
        assert rows[name] == old_rows[name], name
    assert rows["newcomer"] == "| newcomer | 3.25 x | <= 4 | yes | 2026-12-01 | this machine |"
    assert "boom" not in text and "sox is not installed" not in text  # errors go to the console only
    assert text.startswith("# Benchmarks\n\nWords before the table.") and text.endswith("## Words after the table\n")
    assert list(rows) == sorted(rows)
    console = "\n".join(lines)
    assert "skipper: SKIPPED (sox is not installed)" in console and "failer: FAILED (exit 1" in console
    assert "runner: FAILED (exit 0: no RESULT line)" in console


def test_a_good_run_replaces_the_row_and_a_new_file_gets_a_table(tmp_path):
    merged = _table.merge(OLD_TABLE, {"runner": "| runner | 2 x | none (measured) | - | 2026-12-01 | here |"})
    assert _table.rows_of(merged)["runner"].endswith("| here |") and merged.count("| runner |") == 1
    path = tmp_path / "BENCHMARKS.md"
    lines, failed = _table.update(path, [outcome("only", 0, 1234.5)], "here", date="2026-12-01")
    assert not failed and _table.rows_of(path.read_text()) == {
        "only": "| only | 1,234 x | none (measured) | - | 2026-12-01 | here |"}
    lines, failed = _table.update(tmp_path / "absent.md", [outcome("skipper", 77)], "here")
    assert not failed and not (tmp_path / "absent.md").exists()  # nothing ran: nothing written


def test_machine_line_never_fails():
    line = _table.machine()
    assert "cores" in line and line.count(",") >= 1


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_run_all_keeps_the_row_of_a_skipped_benchmark(tmp_path):
    """bench/run_all.sh end to end, on a copy of bench/ whose benchmarks are three tiny stand-ins."""
    bench = tmp_path / "bench"
    bench.mkdir()
    for name in ("run_all.sh", "_result.py", "_table.py"):
        shutil.copy(BENCH / name, bench / name)
    body = ("import sys\nfrom _result import Missing, finish\n\ndef main():\n    print('figures')\n{}\n\n"
            "finish(main, name='{}', unit='x')\n")
    (bench / "bench_skipper.py").write_text(body.format("    raise Missing('sox is not installed')", "skipper"))
    (bench / "bench_failer.py").write_text(body.format("    raise RuntimeError('boom')", "failer"))
    (bench / "bench_runner.py").write_text(body.format("    return 2.5", "runner"))
    (tmp_path / "BENCHMARKS.md").write_text(OLD_TABLE)
    result = subprocess.run(["bash", str(bench / "run_all.sh")], capture_output=True, text=True,
                            env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable}, timeout=120)
    rows, old_rows = _table.rows_of((tmp_path / "BENCHMARKS.md").read_text()), _table.rows_of(OLD_TABLE)
    assert result.returncode == 1, result.stderr  # one benchmark failed
    assert rows["skipper"] == old_rows["skipper"] and rows["failer"] == old_rows["failer"]
    assert rows["runner"].startswith("| runner | 2.5 x | none (measured) | - | ")
    assert "skipper: SKIPPED" in result.stderr and "failer: FAILED" in result.stderr
    assert (tmp_path / "bench" / "out" / "failer.txt").read_text().rstrip().splitlines()[-1].startswith("RESULT ")
    only = subprocess.run(["bash", str(bench / "run_all.sh"), "skipper"], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable}, timeout=120)
    assert only.returncode == 0 and "=== bench/bench_runner.py" not in only.stderr


def test_run_all_needs_no_linux_only_probe():
    script = (BENCH / "run_all.sh").read_text()
    assert "/proc/cpuinfo" not in script and "nproc" not in script and "free -g" not in script


def run_script(tmp_path, body: str, name: str = "bench_probe.py") -> subprocess.Popen:
    script = tmp_path / name
    script.write_text(f"import sys, threading, time\nsys.path.insert(0, {str(BENCH)!r})\nfrom _result import finish\n"
                      + body)
    return subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_nothing_a_lingering_thread_prints_comes_after_the_result_line(tmp_path):
    """A worker still running when `main` returns (a decoding thread, a native pool) must not print after RESULT."""
    process = run_script(tmp_path, "def late():\n    time.sleep(0.5)\n    print('late output', flush=True)\n\n"
                                   "def main():\n    threading.Thread(target=late).start()\n    return 1.0\n\n"
                                   "finish(main, name='probe', unit='x')\n")
    output, _ = process.communicate(timeout=30)
    lines = [line for line in output.splitlines() if line.strip()]
    assert process.returncode == 0 and _result.parse_result(lines[-1])["value"] == 1.0, output
    assert "late output" not in output


def test_sigterm_while_a_benchmark_still_imports_ends_with_a_result_line(tmp_path):
    """Killed before `finish` runs (a slow import): the RESULT line names the script, exit 130."""
    process = run_script(tmp_path, "print('importing', flush=True)\ntime.sleep(60)\n"
                                   "finish(lambda: 1.0, name='never', unit='x')\n", name="bench_slow_start.py")
    assert process.stdout.readline().strip() == "importing"
    fields = terminate_and_read_result(process)
    assert fields["name"] == "slow_start" and fields["value"] is None and "while starting" in fields["error"]


def alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie waiting for its reaper does not)."""
    try:
        return "\tZ" not in Path(f"/proc/{pid}/status").read_text().split("State:")[1].splitlines()[0]
    except (FileNotFoundError, IndexError):
        return False


def test_run_command_shows_a_failures_error_output():
    with pytest.raises(SystemExit) as stop:
        _result.run_command(["bash", "-c", "echo the stage broke >&2; exit 3"])
    assert "exited 3" in str(stop.value.code) and "the stage broke" in str(stop.value.code)
    assert _result.run_command(["bash", "-c", "exit 0"]) >= 0.0 and not _result.RUNNING


def test_an_interrupted_command_takes_every_process_it_started_with_it(tmp_path):
    """Ctrl-C or SIGTERM while a benchmark waits on the loop script: the script's own children (the stages)
    die too, so none writes after the RESULT line or trains on for minutes."""
    import signal

    pid_file = tmp_path / "grandchild"

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, 1.0)
    try:
        with pytest.raises(KeyboardInterrupt):
            _result.run_command(["bash", "-c", f"sleep 60 & echo $! > {pid_file}; wait"])
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    grandchild = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(grandchild) and not _result.RUNNING
