"""A progress bar for long monitor runs: tqdm when installed, else a plain stderr counter.

tqdm is in the ``train`` extra, not the service's; the fallback prints one line at most every
two seconds (and a last one when done), so a run on a server without tqdm still shows it is alive.
Only counts are shown, never what is being counted.
"""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import Any


class Progress:
    """``with Progress(total, desc) as bar: bar.update(n)``; ``total=None`` for an open-ended count."""

    def __init__(
        self, total: int | None, desc: str, *, enabled: bool = True, interval_s: float = 2.0
    ) -> None:
        self.total = total
        self.desc = desc
        self.enabled = enabled
        self.count = 0
        self._interval = interval_s
        self._last = 0.0
        self._bar: Any = None
        if enabled:
            try:
                from tqdm import tqdm

                self._bar = tqdm(total=total, desc=desc, unit="", file=sys.stderr, leave=True)
            except ModuleNotFoundError:
                self._bar = None

    def update(self, n: int = 1) -> None:
        """Advance by ``n``."""
        self.count += n
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.monotonic()
        if now - self._last >= self._interval:
            self._last = now
            self._print()

    def _print(self) -> None:
        """One line with the count (and percentage when the total is known)."""
        if self.total:
            share = 100.0 * self.count / self.total
            print(f"{self.desc}: {self.count}/{self.total} ({share:.0f}%)", file=sys.stderr, flush=True)
        else:
            print(f"{self.desc}: {self.count}", file=sys.stderr, flush=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.enabled:
            self._print()
