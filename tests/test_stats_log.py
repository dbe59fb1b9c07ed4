"""The router's periodic throughput line: rates over busy time only, on a controlled clock."""

from __future__ import annotations

import logging

from lightserve.router.stats_log import StatsLog


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_rates_count_busy_time_only(caplog):
    clock = Clock()
    log = StatsLog(10.0, clock)
    assert log.maybe_log(0, 0, 0, 0, None, None) is None  # idle
    clock.now += 500  # idle for a long time: not counted
    assert log.maybe_log(0, 0, 2, 1, 10, 100) is None  # work arrives
    clock.now += 4
    assert log.maybe_log(800, 40, 3, 0, 20, 100) is None  # 4 s busy: not yet
    clock.now += 6
    with caplog.at_level(logging.INFO, logger="lightserve.router.stats_log"):
        line = log.maybe_log(2000, 100, 3, 0, 30, 100)  # 10 s busy
    assert line == "prompt 200.0 tok/s, generation 10.0 tok/s, 3 running, 0 waiting, KV 30.0% of 100 slots"
    assert "router: " + line in caplog.text
    # The next window starts empty; going idle stops the clock until work returns.
    assert log.maybe_log(2000, 100, 0, 0, 0, 100) is None
    clock.now += 1000
    assert log.maybe_log(2000, 100, 1, 0, 5, 100) is None
    clock.now += 10
    assert log.maybe_log(2500, 150, 1, 0, 6, 100) == (
        "prompt 50.0 tok/s, generation 5.0 tok/s, 1 running, 0 waiting, KV 6.0% of 100 slots")


def test_the_prefix_cache_hit_rate_is_the_share_of_the_window_s_admitted_prompt_tokens():
    clock = Clock()
    log = StatsLog(10.0, clock)
    log.maybe_log(0, 0, 1, 0, 0, 100)
    clock.now += 10
    assert log.maybe_log(500, 10, 1, 0, 5, 100, cache_queried=1000, cache_hit=100).endswith(
        ", prefix cache hit rate 10.0%")
    clock.now += 10
    assert log.maybe_log(800, 20, 1, 0, 5, 100, cache_queried=3000, cache_hit=1600).endswith(
        ", prefix cache hit rate 75.0%")  # (1600 - 100) / (3000 - 1000): this window's admissions only
    clock.now += 10
    assert "hit rate" not in log.maybe_log(900, 30, 1, 0, 5, 100, cache_queried=3000, cache_hit=1600)


def test_zero_interval_never_logs():
    clock = Clock()
    log = StatsLog(0, clock)
    for _ in range(3):
        clock.now += 100
        assert log.maybe_log(10, 10, 1, 1, None, None) is None
