"""The generator the service keeps loaded between ``generate`` jobs.

Loading Wan2.1-I2V-14B + EX-4D takes minutes (and ``--compile`` another ~16 s on an H100); an artist
iterating on seeds, prompts or camera moves should pay that once. The service keeps the last generator
for ``keep_alive`` seconds after a job finishes (like a model server's keep-alive):

- the next ``generate`` with the same generator, models folder, device and VRAM profile reuses it;
- a different one closes the old generator first (never two in VRAM);
- a cancelled or failed generation closes it (cancel frees GPU memory, an error may have left the
  model in a bad state); so does a depth-model job (which needs the VRAM) and ``shutdown``;
- after ``keep_alive`` idle seconds the GPU worker closes it; ``keep_alive = 0`` loads per job
  (what ``ex4d run`` and any job context without the service's instance use).

Only the GPU worker thread touches it (one job at a time), so it needs no lock.
"""

from __future__ import annotations

import gc
import logging
import sys
import time
from collections.abc import Callable, Hashable
from typing import Any

log = logging.getLogger("ex4d_backend.service")

DEFAULT_KEEP_ALIVE_S = 600.0


def free_memory() -> None:
    """Collect garbage and hand torch's cached CUDA blocks back to the driver (no-op without torch)."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


class ResidentGenerator:
    """At most one loaded generator, keyed by what it was loaded with."""

    def __init__(self, keep_alive_s: float = DEFAULT_KEEP_ALIVE_S, clock: Callable[[], float] = time.monotonic):
        self.keep_alive_s = max(0.0, float(keep_alive_s))
        self._clock = clock
        self._key: Hashable | None = None
        self._gen: Any = None
        self._idle_since: float | None = None  # None while a job uses it

    @property
    def loaded(self) -> Hashable | None:
        """The key of the loaded generator, or None."""
        return self._key if self._gen is not None else None

    def acquire(self, key: Hashable, load: Callable[[], Any]) -> tuple[Any, bool]:
        """``(generator, reused)``: the loaded one if ``key`` matches, else ``load()`` after closing the old."""
        if self._gen is not None and self._key == key:
            self._idle_since = None
            log.info("generator %s reused (kept loaded)", key)
            return self._gen, True
        self.release()
        gen = load()
        self._key, self._gen, self._idle_since = key, gen, None
        return gen, False

    def done(self, ok: bool) -> None:
        """After a job: keep the generator for ``keep_alive_s`` if it finished well, else close it."""
        if not ok or self.keep_alive_s <= 0:
            self.release()
        else:
            self._idle_since = self._clock()

    def seconds_left(self) -> float | None:
        """Seconds until the idle generator expires (0 = now), or None when nothing can expire."""
        if self._gen is None or self._idle_since is None:
            return None
        return max(0.0, self._idle_since + self.keep_alive_s - self._clock())

    def expire(self) -> bool:
        """Close the generator if it has been idle for ``keep_alive_s``; True if it did."""
        left = self.seconds_left()
        if left is not None and left <= 0:
            log.info("generator %s closed after %.0f s idle", self._key, self.keep_alive_s)
            self.release()
            return True
        return False

    def release(self) -> None:
        """Close the loaded generator (if any) and free its memory."""
        gen, self._gen, self._key, self._idle_since = self._gen, None, None, None
        if gen is None:
            return
        try:
            gen.close()
        finally:
            del gen
            free_memory()
