"""Bad input: the exception that skips one file, and the JSONL report that records why.

One bad file never stops a run: preprocessing catches `BadInput`, writes one line to the report and goes on.
Everything else (a full disk, a wrong option) is a real error and propagates.
"""
from __future__ import annotations

import json
import logging
import time
from collections import Counter
from pathlib import Path

# The closed set of reasons, so summaries and tests can count them.
REASONS = (
    "zero_length",        # the file has no bytes
    "corrupt",            # no container or stream could be opened / no packets
    "truncated",          # demuxing failed part way, or too few frames where the container claims enough time
    "no_video_stream",    # e.g. an audio-only file
    "unsupported_codec",  # no decoder backend allowed for this codec can decode it here
    "too_short",          # fewer frames than needed at the target fps
    "too_small",          # short side below the configured minimum
    "upscale",            # the bucket needs the source enlarged more than the configured maximum factor
    "static",             # near-static: consecutive frames differ less than the configured threshold
    "scene_cut",          # a hard cut: a jump in the frames' luma histograms above the configured threshold
    "decode_error",       # every allowed backend failed while decoding
    "no_caption",         # no <name>.txt and no captions.jsonl entry, or an empty caption
    "bad_caption",        # a caption .txt that is not UTF-8, or a captions.jsonl line that is not a valid entry
    "missing_video",      # a captions.jsonl line names a video that does not exist
    "no_real_clip",       # an imported negative names a real clip that is not in the store
    "duplicate_negative", # a second imported file for one generator's negative of a clip (clip.mp4 and clip.webm)
    "unexpected_error",   # any other exception while reading/encoding this one file (logged with traceback)
)
MAX_UNEXPECTED_IN_A_ROW = 5  # then it is not the files: stop the run rather than skip a whole data set


class BadInput(Exception):
    """One input that is skipped, with a reason from REASONS and a detail for humans."""

    def __init__(self, path: str | Path, reason: str, detail: str):
        assert reason in REASONS, reason
        self.path, self.reason, self.detail = str(path), reason, detail
        super().__init__(f"{path}: {reason}: {detail}")

    def __reduce__(self):   # pickled as its three fields (rank 0's scan is shared with the other ranks)
        return BadInput, (self.path, self.reason, self.detail)


class SkipReport:
    """Appends one JSON line per skipped input to `path` (when given) and counts reasons."""

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path else None
        self.counts: Counter[str] = Counter()
        self._unexpected_in_a_row = 0
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def attempt(self, path: str | Path, stage: str, fn, *args):
        """fn(*args), or None after recording why this input is skipped. Exceptions other than BadInput
        are skipped too (one odd file must not end a long run) unless MAX_UNEXPECTED_IN_A_ROW happen in a row."""
        try:
            result = fn(*args)
        except BadInput as e:
            self.add(e, stage)
            return None
        except Exception as e:  # noqa: BLE001 - deliberately broad, bounded by the streak below
            self._unexpected_in_a_row += 1
            if self._unexpected_in_a_row >= MAX_UNEXPECTED_IN_A_ROW:
                raise
            logging.getLogger("megatron_regdpo.data").warning("%s: unexpected error, skipped", path, exc_info=True)
            self.add(BadInput(path, "unexpected_error", f"{type(e).__name__}: {e}"), stage)
            return None
        self._unexpected_in_a_row = 0
        return result

    def add(self, err: BadInput, stage: str) -> None:
        self.counts[err.reason] += 1
        if self.path:
            line = {"file": err.path, "reason": err.reason, "detail": err.detail, "stage": stage,
                    "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
            with self.path.open("a") as f:
                f.write(json.dumps(line) + "\n")

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        if not self.counts:
            return "skipped 0"
        parts = ", ".join(f"{reason} {n}" for reason, n in sorted(self.counts.items()))
        where = f" (see {self.path})" if self.path else ""
        return f"skipped {self.total}: {parts}{where}"


class RoundReport(SkipReport):
    """The SkipReport of one rank of a multi-rank data job (data/ranks.py): it keeps its last skip, which a
    round hands to the other ranks; rank 0 (the only one with a path) writes every rank's skips down."""
    last: tuple[str, str, str, str] | None = None   # (file, reason, detail, stage)

    def add(self, err: BadInput, stage: str) -> None:
        self.last = (err.path, err.reason, err.detail, stage)
        super().add(err, stage)

    def take(self, last: tuple[str, str, str, str]) -> None:
        """Another rank's skip, as its `last` came out of a round: counted (and written down on rank 0)."""
        path, reason, detail, stage = last
        self.add(BadInput(path, reason, detail), stage)


def read_report(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


class DecodeFailure(RuntimeError):
    """A decoder backend failed on a file that probed fine; the next backend in the preference list is tried."""
