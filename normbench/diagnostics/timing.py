"""The host time a diagnostic spends, for the run record (``diagnostics.seconds``)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager


class Timed:
    """``seconds``: the host time spent in ``_timed()`` blocks during this fit (a callback
    resets it when its fit starts)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.seconds = 0.0

    @contextmanager
    def _timed(self) -> Iterator[None]:
        """Adds the host time of the block to ``seconds``."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds += time.perf_counter() - start
