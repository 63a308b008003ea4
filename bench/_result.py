"""What every benchmark in bench/ shares: its last line, and how it says that it could not run here.

A benchmark's `main` returns its headline figure and `finish(main, name=..., unit=..., goal=...)`
prints, as the last line of the output, one line

    RESULT {"name": ..., "value": ..., "unit": ..., "goal": ..., "met": ...}

`goal` is a comparison such as ">= 50" or "<= 1.3" (None: the figure is measured, not judged) and
`met` is the value checked against it (None without a goal or a value). When a resource the
benchmark needs is missing (a command such as sox, a Debian song package, the pretrained codec
weights, a GPU), the `require_*` helpers raise `Missing`; `finish` then prints why, a RESULT line
with value and met null and a "skipped" reason, and exits with status 77 (`SKIPPED`), which
bench/run_all.sh reads as "keep the previous row". Any other error prints its traceback, a RESULT
line with an "error" field, and exits 1.
"""
from __future__ import annotations

import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Callable, NoReturn

SKIPPED = 77  # the exit status of a benchmark that lacks a resource (automake's "skipped")
PREFIX = "RESULT "


class Missing(RuntimeError):
    """A resource the benchmark needs is not on this machine; the message says which and how to get it."""


def require_command(command: str, install: str, env: str | None = None) -> str:
    """The full path of `command` (or of the path in the environment variable `env`, when set)."""
    wanted = os.environ.get(env, command) if env else command
    found = shutil.which(wanted)
    if found is None:
        raise Missing(f"{wanted} is not installed or not on PATH ({install})")
    return found


def require_debian_package(package: str, suffix: str = "") -> list[str]:
    """The files of an installed Debian package (those ending in `suffix`), sorted; Missing when dpkg,
    the package or such files are absent."""
    if shutil.which("dpkg") is None:
        raise Missing(f"dpkg is not available, so the Debian package {package} cannot be found "
                      f"(this benchmark needs a Debian or Ubuntu machine with `apt-get install {package}`)")
    listing = subprocess.run(["dpkg", "-L", package], capture_output=True, text=True)
    files = sorted(line for line in listing.stdout.splitlines() if line.lower().endswith(suffix.lower()))
    if listing.returncode != 0 or not files:
        holds = f" or holds no {suffix} files" if suffix else ""
        raise Missing(f"the Debian package {package} is not installed{holds} (apt-get install {package})")
    return files


def require_cuda(device: str) -> None:
    """Missing when `device` names a CUDA device and torch sees none."""
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise Missing(f"--device {device} needs a CUDA GPU and torch sees none "
                          f"(torch {torch.__version__}, CUDA build {torch.version.cuda})")


def require_codec(spec: str) -> None:
    """Missing when the codec `spec` can be neither read here nor downloaded (pipeline.codec.probe)."""
    from pipeline.codec import probe

    if probe(spec) == "unavailable":
        raise Missing(f"the codec {spec!r} is not in the Hugging Face cache and the hub cannot be reached "
                      f"(`huggingface-cli download {spec}` on a machine with internet, or --codec random:0)")


def met(value: float | None, goal: str | None) -> bool | None:
    """Whether `value` meets `goal` ("<= 1.3", ">= 50", "< 9", "> 0"); None without either."""
    if goal is None or value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    operator, _, bound = goal.strip().partition(" ")
    compare = {"<=": float.__le__, ">=": float.__ge__, "<": float.__lt__, ">": float.__gt__}.get(operator)
    if compare is None:
        raise ValueError(f"goal {goal!r}: write it as '<op> <number>' with <op> one of <=, >=, <, >")
    return bool(compare(float(value), float(bound)))


def result_line(name: str, value: float | None, unit: str, goal: str | None = None, **extra) -> str:
    """The `RESULT {json}` line (NaN and infinities become null: the line stays valid JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        value = None
    fields = {"name": name, "value": value, "unit": unit, "goal": goal, "met": met(value, goal), **extra}
    return PREFIX + json.dumps(fields, sort_keys=False, default=str)


def parse_result(output: str) -> dict | None:
    """The last RESULT line's fields in a benchmark's output, or None when it printed none (or a broken one)."""
    for line in reversed(output.splitlines()):
        if line.startswith(PREFIX):
            try:
                fields = json.loads(line[len(PREFIX):])
            except ValueError:
                return None
            return fields if isinstance(fields, dict) else None
    return None


def cpu_name() -> str:
    """The processor's name, on Linux, macOS or elsewhere; never raises."""
    try:
        if platform.system() == "Darwin":
            return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True,
                                  text=True, timeout=5).stdout.strip() or platform.machine()
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


def _exit(code: int) -> NoReturn:
    """Flush and leave at once: nothing (native threads' destructors, a worker's late output) may print
    after the RESULT line. The benchmarks' temporary folders are `with` blocks, closed by then."""
    sys.stdout.flush()
    sys.stderr.flush()
    LEAVE(code)


LEAVE = os._exit  # tests that call `finish` in their own process replace it with sys.exit


def _interrupted_while_starting(signum, frame) -> None:
    """SIGTERM before `finish` runs (while the benchmark imports its modules): a RESULT line all the same."""
    name = Path(sys.argv[0]).stem.removeprefix("bench_") or "benchmark"
    reason = f"interrupted (signal {signal.Signals(signum).name}) while starting"
    print(reason, flush=True)
    print(result_line(name, None, "", error=reason), flush=True)
    _exit(130)


signal.signal(signal.SIGTERM, _interrupted_while_starting)  # from the import of this module until `finish`


def stop_on_sigterm() -> None:
    """SIGTERM (what `timeout` and CI runners send) raises KeyboardInterrupt like Ctrl-C, so an
    interrupted benchmark still ends its output with a RESULT line (subprocesses it runs are killed
    by `subprocess.run` on the way out)."""
    signal.signal(signal.SIGTERM, _interrupt)


def finish(main: Callable[[], float | dict | None], name: str, unit: str, goal: str | None = None) -> NoReturn:
    """Run `main` and end the output with its RESULT line; exit 0, SKIPPED (77), 1 or 130.

    `main` returns the headline value, or a dict with "value" and extra fields to print (it may also
    override "name", "unit" and "goal", e.g. for another suite of the same script). Interrupted by
    Ctrl-C or SIGTERM, it still prints the RESULT line (value null, an "error") and exits 130."""
    stop_on_sigterm()
    try:
        outcome = main()
    except KeyboardInterrupt as interrupt:  # Ctrl-C, or SIGTERM from a time limit (`timeout`, a CI runner)
        sys.stdout.flush()
        reason = f"interrupted ({interrupt or 'Ctrl-C'}) before it finished"
        print(reason, flush=True)
        print(result_line(name, None, unit, goal, error=reason), flush=True)
        _exit(130)
    except Missing as missing:
        sys.stdout.flush()
        print(f"skipped: {missing}", flush=True)
        print(result_line(name, None, unit, goal, skipped=str(missing)), flush=True)
        _exit(SKIPPED)
    except SystemExit as stop:
        if stop.code is None or isinstance(stop.code, int):
            raise  # argparse's --help (0) and usage errors (2): no benchmark ran
        print(stop.code, file=sys.stderr, flush=True)
        print(result_line(name, None, unit, goal, error=str(stop.code).splitlines()[0]), flush=True)
        _exit(1)
    except Exception as error:  # noqa: BLE001 - any failure still ends the output with a RESULT line
        traceback.print_exc()
        sys.stderr.flush()
        print(result_line(name, None, unit, goal, error=f"{type(error).__name__}: {error}".splitlines()[0]),
              flush=True)
        _exit(1)
    fields = dict(outcome) if isinstance(outcome, dict) else {"value": outcome}
    name, unit, goal = fields.pop("name", name), fields.pop("unit", unit), fields.pop("goal", goal)
    value = fields.pop("value", None)
    sys.stderr.flush()
    print(result_line(name, value, unit, goal, **fields), flush=True)
    _exit(0)


RUNNING: set = set()  # the commands `run_command` waits on now (a benchmark may wait on several, from threads)


def run_command(command: list, env: dict | None = None) -> float:
    """Run `command` (a stage, the loop script) to its end -> its seconds. It runs in a process group of
    its own with no output but its error output, which a failure shows (SystemExit: `finish` prints it
    and the RESULT line). Interrupted (Ctrl-C, SIGTERM), the whole group is killed before the exception
    goes on: no stage it started outlives the benchmark or writes after its RESULT line."""
    import time

    started = time.perf_counter()
    process = subprocess.Popen([str(part) for part in command], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True, env=env, start_new_session=True)
    RUNNING.add(process)
    try:
        _, stderr = process.communicate()
    except BaseException:
        kill_group(process)
        raise
    finally:
        RUNNING.discard(process)
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, command))} exited {process.returncode}:\n{stderr[-3000:]}")
    return time.perf_counter() - started


def kill_group(process: subprocess.Popen) -> None:
    """End `process` and every process it started (its process group), and reap it."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def stop_running() -> None:
    """Kill every command `run_command` waits on (a benchmark interrupted while threads wait on them)."""
    for process in list(RUNNING):
        kill_group(process)


def link_songs(root: Path, artist: str, songs: Path, limit: int) -> int:
    """raw_audio/<artist>/<song>.ogg -> each song folder's song.ogg (symlinks); returns the count."""
    folder = root / "raw_audio" / artist
    folder.mkdir(parents=True, exist_ok=True)
    found = sorted((songs / artist).glob("*/song.ogg"))[:limit or None]
    for song in found:
        link = folder / f"{song.parent.name}.ogg"
        if not link.exists():
            link.symlink_to(song)
    return len(found)  # require_resources checked that there are songs
