"""The router's periodic one-line summary of throughput and load, as vLLM and TGI print it:
what an operator reads first when the server seems slow."""

from __future__ import annotations

import logging
import time
from typing import Callable, Optional

logger = logging.getLogger(__name__)


class StatsLog:
    """Every `interval_s` seconds of busy time (0: never), logs the prompt and generation
    throughput over that time, the running and waiting requests, KV use, and the share of the
    prompt tokens admitted over that time that the prefix cache already held.

    Rates are per second the router had work: idle time (the loop blocked waiting for a
    request) is not counted, so a line never mixes a burst's rate with the silence after it.
    """

    def __init__(self, interval_s: float, clock: Callable[[], float] = time.monotonic):
        self.interval_s = interval_s
        self.clock = clock
        self._last_call = clock()
        self._was_busy = False
        self._busy_s = 0.0
        self._logged_prompt = self._logged_generated = 0
        self._logged_queried = self._logged_hit = 0

    def maybe_log(self, prompt_tokens: int, generated_tokens: int, running: int, waiting: int,
                  kv_used: Optional[int], kv_total: Optional[int], cache_queried: int = 0,
                  cache_hit: int = 0) -> Optional[str]:
        """Called once per router loop with the running token totals (`cache_queried` /
        `cache_hit`: prompt tokens looked up in the prefix cache / found there); logs (and
        returns) a line when one is due."""
        now = self.clock()
        if self._was_busy:
            self._busy_s += now - self._last_call
        self._last_call, self._was_busy = now, bool(running or waiting)
        if self.interval_s <= 0 or self._busy_s < self.interval_s:
            return None
        prompt = (prompt_tokens - self._logged_prompt) / self._busy_s
        generated = (generated_tokens - self._logged_generated) / self._busy_s
        self._busy_s, self._logged_prompt, self._logged_generated = 0.0, prompt_tokens, generated_tokens
        queried, hit = cache_queried - self._logged_queried, cache_hit - self._logged_hit
        self._logged_queried, self._logged_hit = cache_queried, cache_hit
        kv = f", KV {100 * kv_used / kv_total:.1f}% of {kv_total} slots" if kv_used is not None and kv_total else ""
        cache = f", prefix cache hit rate {100 * hit / queried:.1f}%" if queried else ""
        line = (f"prompt {prompt:.1f} tok/s, generation {generated:.1f} tok/s, {running} running, "
                f"{waiting} waiting{kv}{cache}")
        logger.info("router: %s", line)
        return line
