"""Threads sized to the cores that are free, and one warning when a run falls far below its speed.

torch splits each operation evenly between its threads and waits for the last one. When another
process holds a core, the thread that shares it finishes late and every step waits for it: on a
2-core machine with one core busy, two threads ran the demo 1.7x slower than one thread on an idle
machine (BENCHMARKS.md, "A busy machine"). So a stage samples how busy the machine is when it
starts and uses only the cores that are free; a run that later slows down a lot (another program
started) re-samples, drops to the free cores and says so once, with the reason and the fix.

`OMP_NUM_THREADS` (or a stage's `--threads`) always wins: then nothing is chosen for you.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

LOG = logging.getLogger("pipeline.threads")
PROC_STAT = Path("/proc/stat")
SAMPLE_SECONDS = 0.2


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


def cores_busy_elsewhere(seconds: float = SAMPLE_SECONDS) -> float:
    """How many cores other processes keep busy, sampled over `seconds` while this one sleeps.
    Where /proc/stat is missing (macOS), the 1-minute load average stands in."""
    first = _cpu_times()
    if first is None:
        try:
            return float(os.getloadavg()[0])
        except OSError:
            return 0.0
    time.sleep(seconds)
    second = _cpu_times()
    busy, total = second[0] - first[0], second[1] - first[1]
    return (os.cpu_count() or 1) * busy / total if total > 0 else 0.0


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
