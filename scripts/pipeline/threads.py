"""Threads sized to the cores that are free, and one warning when a run falls far below its speed.

torch splits each operation evenly between its threads and waits for the last one. When another
process holds a core, the thread that shares it finishes late and every step waits for it: on a
2-core machine with one core busy, two threads ran the demo 1.7x slower than one thread on an idle
machine (BENCHMARKS.md, "A busy machine"). So a stage samples how busy the machine is when it
starts and uses only the cores that are free; a run that later slows down a lot (another program
started) re-samples, drops to the free cores and says so once, with the reason and the fix.

The sample is the machine's busy time less this process's own CPU time. It is read without waiting
over the time since the previous reading (or since this module was imported: a stage's imports and
model loading) when that time is long enough, recent enough, and this process left at least half
a core to the others; otherwise the process sleeps `SAMPLE_SECONDS` to take it (each piece of stage 5
used to wait those 0.2 s).

`OMP_NUM_THREADS` (or a stage's `--threads`) always wins: then nothing is chosen for you.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

LOG = logging.getLogger("pipeline.threads")
PROC_STAT = Path("/proc/stat")
SAMPLE_SECONDS = 0.2  # the shortest interval a sample covers
MAX_SAMPLE_AGE = 60.0  # an interval since the previous reading longer than this is not used: sampled anew


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS
        return max(1, os.cpu_count() or 1)


def _cpu_times() -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs from /proc/stat, or None where there is no such file."""
    try:
        fields = [int(value) for value in PROC_STAT.read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # user nice system idle iowait irq softirq steal (guest is inside user)
    return total - idle, total


@dataclass(frozen=True)
class Mark:
    """One end of a sample: when, the machine's CPU counters, and this process's own CPU seconds."""
    wall: float
    cpu: tuple[int, int] | None
    own: float


def mark() -> Mark:
    return Mark(wall=time.monotonic(), cpu=_cpu_times(), own=time.process_time())


def busy_between(first: Mark, second: Mark) -> float:
    """Cores other processes kept busy between two marks: all CPUs' busy time less this process's own."""
    busy, total = second.cpu[0] - first.cpu[0], second.cpu[1] - first.cpu[1]
    machine = (os.cpu_count() or 1) * busy / total if total > 0 else 0.0
    wall = second.wall - first.wall
    own = (second.own - first.own) / wall if wall > 0 else 0.0
    return max(0.0, machine - own)


def readable_without_waiting(first: Mark, second: Mark, seconds: float) -> bool:
    """Whether the interval between two marks can stand for a fresh sample: at least `seconds` and at
    most MAX_SAMPLE_AGE long, and this process left at least half a core to the others (a process
    that filled every core would see the others only where they took time from it; one busy core
    elsewhere still shows as more than the 0.6 of a core `free_cores` counts as busy)."""
    if first.cpu is None or second.cpu is None:
        return False
    wall = second.wall - first.wall
    return 0 < wall and seconds <= wall <= MAX_SAMPLE_AGE and (
        (second.own - first.own) / wall <= usable_cores() - 0.5)


_since = mark()  # the start of the interval the next reading may use: this import, then each reading


def cores_busy_elsewhere(seconds: float = SAMPLE_SECONDS) -> float:
    """How many cores other processes keep busy: over the time since the previous reading when
    `readable_without_waiting`, else sampled over `seconds` while this process sleeps. Where
    /proc/stat is missing (macOS), the 1-minute load average stands in."""
    global _since
    first, now = _since, mark()
    if now.cpu is None:
        try:
            return float(os.getloadavg()[0])
        except OSError:
            return 0.0
    if not readable_without_waiting(first, now, seconds):
        first = now
        time.sleep(seconds)
        now = mark()
    _since = now
    return busy_between(first, now)


def free_cores(busy: float | None = None) -> int:
    """Usable cores less those busy elsewhere (a core counts as busy from 60 % of its time), at least 1."""
    busy = cores_busy_elsewhere() if busy is None else busy
    return max(1, min(usable_cores(), usable_cores() - int(busy + 0.4)))


def threads_were_chosen() -> bool:
    """True when the user fixed the thread count (OMP_NUM_THREADS): leave it alone."""
    return bool(os.environ.get("OMP_NUM_THREADS", "").strip())


def configure(log: logging.Logger = LOG, busy: float | None = None) -> int:
    """Set torch's intra-op threads to the free cores (unless the user chose) and return the count."""
    import torch

    if threads_were_chosen():
        return torch.get_num_threads()
    cores = usable_cores()
    threads = free_cores(busy)
    if threads < min(cores, torch.get_num_threads()):
        log.info("%d of %d cores are busy with other processes: using %d torch thread%s (a thread that waits "
                 "for a busy core slows every step; set OMP_NUM_THREADS to choose yourself)",
                 cores - threads, cores, threads, "" if threads == 1 else "s")
        torch.set_num_threads(threads)
    return torch.get_num_threads()


class SpeedWatch:
    """Notices a run that falls far below the speed it had, once: re-samples the machine, drops to the
    free cores when other processes took some, and logs the reason and the fix.

    `observe(amount)` after each unit of work (frames, steps); the first `warmup` seconds set the
    expectation, then every `every` seconds the recent rate is compared with it.
    """

    def __init__(self, what: str, unit: str, log: logging.Logger = LOG, warmup: float = 20.0, every: float = 20.0,
                 slow_factor: float = 0.5, clock=time.monotonic):
        self.what, self.unit, self.log = what, unit, log
        self.warmup, self.every, self.slow_factor, self.clock = warmup, every, slow_factor, clock
        self.started = clock()
        self.expected: float | None = None  # amount per second measured over the warm-up
        self.window_start, self.window_amount = self.started, 0.0
        self.warned = False

    def observe(self, amount: float) -> None:
        self.window_amount += amount
        now = self.clock()
        elapsed = now - self.window_start
        if self.warned or elapsed < (self.warmup if self.expected is None else self.every):
            return
        rate = self.window_amount / elapsed
        if self.expected is None:
            self.expected = rate
        elif rate < self.slow_factor * self.expected:
            self._slowed_down(rate)
        self.window_start, self.window_amount = now, 0.0

    def _slowed_down(self, rate: float) -> None:
        import torch

        self.warned = True
        busy = cores_busy_elsewhere()
        before = torch.get_num_threads()
        reason = (f"other processes keep {busy:.1f} of {usable_cores()} cores busy" if busy >= 0.6
                  else "the machine is not busy: the slowdown has another cause (swap, thermal limits, a smaller batch)")
        after = before if threads_were_chosen() else min(before, free_cores(busy))
        if after < before:
            torch.set_num_threads(after)
        fix = (f"now using {after} thread{'s' if after != 1 else ''} instead of {before}" if after < before else
               "set OMP_NUM_THREADS=1 or stop the other work" if busy >= 0.6 else "check the machine")
        self.log.warning("%s slowed down to %.0f %s/s from %.0f: %s; %s", self.what, rate, self.unit,
                         self.expected, reason, fix)
