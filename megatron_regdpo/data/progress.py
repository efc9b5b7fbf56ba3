"""A progress bar with rate and ETA for the long steps (preprocess, negative generation and import).

tqdm comes with transformers/diffusers (both depend on it); the small fallback keeps the tools working
where it is missing. Output goes to stderr so that stdout stays parseable.
"""
from __future__ import annotations

import sys
import time


class Bar:
    """A bar advanced by hand (`update(n)`): rank 0 of a multi-rank job counts every rank's clips, so its
    clips/s and ETA are the job's. Disabled: does nothing."""

    def __init__(self, total: int, desc: str = "", unit: str = "clip", enabled: bool = True):
        self.total, self.desc, self.unit, self.done = total, desc, unit, 0
        self.start, self._last, self._tqdm, self.enabled = time.monotonic(), 0.0, None, enabled
        if enabled:
            try:
                from tqdm.auto import tqdm
                self._tqdm = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, file=sys.stderr)
            except ImportError:  # pragma: no cover - tqdm ships with transformers
                pass

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._tqdm is not None:
            self._tqdm.update(n)
        elif self.enabled and n:
            now = time.monotonic()
            if now - self._last >= 0.5 or self.done == self.total:
                self._last = now
                _draw(self.desc, self.done, self.total, self.unit, self.start, now)

    def close(self) -> None:
        if self._tqdm is not None:
            self._tqdm.close()
            self._tqdm = None
        elif self.enabled and self.done:
            print(file=sys.stderr)
        self.enabled = False


def _draw(desc: str, done: int, total: int | None, unit: str, start: float, now: float) -> None:
    rate = done / max(now - start, 1e-9)
    eta = f", ETA {((total - done) / rate):.0f} s" if total and rate > 0 else ""
    of = f"/{total}" if total else ""
    print(f"\r{desc}: {done}{of} {unit}s, {rate:.2f} {unit}/s{eta}", end="", file=sys.stderr)


def quiet_library_logs() -> None:
    """For the tools: no per-file "Loading weights" bars or info chatter from transformers/diffusers."""
    for name in ("transformers", "diffusers"):
        try:
            lib = __import__(f"{name}.utils", fromlist=["logging"])
            lib.logging.disable_progress_bar()
            lib.logging.set_verbosity_error()
        except (ImportError, AttributeError):
            pass
