"""Threads sized to the free cores, and the one warning of a run that slows down."""
from __future__ import annotations

import logging

import pytest
import torch

from pipeline import threads


@pytest.fixture
def two_cores(monkeypatch):
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    previous = torch.get_num_threads()
    yield
    torch.set_num_threads(previous)


@pytest.mark.parametrize("busy, free", [(0.0, 2), (0.3, 2), (0.7, 1), (1.0, 1), (1.9, 1), (5.0, 1)])
def test_free_cores(two_cores, busy, free):
    assert threads.free_cores(busy) == free


def test_the_sampled_load_is_a_count_of_cores():
    busy = threads.cores_busy_elsewhere(0.05)
    assert 0.0 <= busy <= (torch.get_num_threads() + 64)


def test_a_sample_is_the_machines_busy_time_less_this_process(two_cores, monkeypatch):
    monkeypatch.setattr(threads.os, "cpu_count", lambda: 2)
    start = threads.Mark(wall=0.0, cpu=(0, 0), own=0.0)
    # 2 s on 2 CPUs: 400 jiffies, 300 of them busy (1.5 cores), 1 s of them this process's (0.5 core)
    after_work = threads.Mark(wall=2.0, cpu=(300, 400), own=1.0)
    assert threads.busy_between(start, after_work) == pytest.approx(1.0)
    assert threads.readable_without_waiting(start, after_work, seconds=0.2)
    filled_the_cores = threads.Mark(wall=2.0, cpu=(400, 400), own=3.2)  # 1.6 of 2 cores: others hardly visible
    assert not threads.readable_without_waiting(start, filled_the_cores, seconds=0.2)
    assert not threads.readable_without_waiting(start, threads.Mark(0.1, (10, 20), 0.0), seconds=0.2)  # too short
    assert not threads.readable_without_waiting(start, threads.Mark(600.0, (10, 20), 0.0), seconds=0.2)  # too old


def test_the_load_is_read_without_waiting_after_work_that_left_a_core(two_cores, monkeypatch):
    monkeypatch.setattr(threads.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(threads, "_since", threads.Mark(wall=0.0, cpu=(0, 0), own=0.0))  # e.g. the import
    after_loading = threads.Mark(wall=2.0, cpu=(300, 400), own=1.0)
    monkeypatch.setattr(threads, "mark", lambda: after_loading)
    monkeypatch.setattr(threads.time, "sleep", lambda seconds: pytest.fail("slept although it could read"))
    assert threads.cores_busy_elsewhere() == pytest.approx(1.0)
    assert threads._since == after_loading  # the next reading covers the time from here


def test_a_process_that_filled_the_cores_samples_while_it_sleeps(two_cores, monkeypatch):
    monkeypatch.setattr(threads.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(threads, "_since", threads.Mark(wall=0.0, cpu=(0, 0), own=0.0))
    marks = iter([threads.Mark(wall=2.0, cpu=(400, 400), own=4.0),  # generation and decoding on both cores
                  threads.Mark(wall=2.2, cpu=(420, 440), own=4.0)])  # the sleep: another process held one core
    monkeypatch.setattr(threads, "mark", lambda: next(marks))
    slept = []
    monkeypatch.setattr(threads.time, "sleep", slept.append)
    assert threads.cores_busy_elsewhere() == pytest.approx(1.0)
    assert slept == [threads.SAMPLE_SECONDS]


def test_configure_uses_the_free_cores_and_says_why(two_cores, caplog):
    torch.set_num_threads(2)
    with caplog.at_level(logging.INFO, logger="pipeline.threads"):
        assert threads.configure(busy=1.0) == 1
    assert "1 of 2 cores are busy" in caplog.text and "OMP_NUM_THREADS" in caplog.text


def test_configure_leaves_a_chosen_count_alone(two_cores, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    torch.set_num_threads(2)
    assert threads.configure(busy=1.0) == 2


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_a_run_that_slows_down_drops_to_the_free_cores_once(two_cores, monkeypatch, caplog):
    torch.set_num_threads(2)
    monkeypatch.setattr(threads, "cores_busy_elsewhere", lambda seconds=0: 1.0)
    clock = Clock()
    watch = threads.SpeedWatch("training", "frames", warmup=10, every=10, clock=clock)
    for rate in [1000] * 3 + [300] * 3:  # 10 s windows: 1000 frames/s, then 300 (another process started)
        clock.now += 10
        with caplog.at_level(logging.WARNING, logger="pipeline.threads"):
            watch.observe(rate * 10)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "slowed down to 300 frames/s from 1000" in warnings[0].getMessage()
    assert "1.0 of 2 cores busy" in warnings[0].getMessage() and "now using 1 thread" in warnings[0].getMessage()
    assert torch.get_num_threads() == 1


def test_a_steady_run_says_nothing(two_cores, caplog):
    clock = Clock()
    watch = threads.SpeedWatch("generation", "frames", warmup=5, every=5, clock=clock)
    with caplog.at_level(logging.WARNING, logger="pipeline.threads"):
        for _ in range(20):
            clock.now += 1
            watch.observe(500 * (0.8 if clock.now % 2 else 1.0))
    assert not caplog.records and not watch.warned


def test_generation_plans_its_threads_on_the_free_cores(monkeypatch):
    from pipeline import generation

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(generation, "free_cores", lambda: 1)
    plan = generation.thread_plan("cpu")
    assert (plan.generate, plan.decode, plan.overlap) == (1, 1, False)  # one free core: decode at the end
    monkeypatch.setattr(generation, "free_cores", lambda: 4)
    plan = generation.thread_plan("cpu")
    assert (plan.generate, plan.decode, plan.overlap) == (1, 3, True)
    assert generation.thread_plan("cpu", requested=2).generate == 2  # --threads wins


def test_generation_progress_passes_through_the_speed_watch(monkeypatch):
    from pipeline import generation

    seen, observed = [], []
    monkeypatch.setattr(generation.SpeedWatch, "observe", lambda self, amount: observed.append(amount))
    reported = generation.watch_speed(lambda final, frames: seen.append(final))
    for final in (10, 25, 25, 40):
        reported(final, None)
    assert seen == [10, 25, 25, 40] and observed == [10, 15, 0, 15]
