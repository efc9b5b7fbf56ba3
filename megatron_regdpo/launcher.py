"""`python -m megatron_regdpo.launcher [torchrun options] -m megatron_regdpo.train ...`: torchrun, quiet when
the workers already said why they stopped.

torch's own launcher (torch.distributed.run: the same options, run in this process), except for how a failed
job ends. torchrun reports any failed worker with a ChildFailedError: an `E...` log line, then a Python
traceback of its own and a block per failed rank (host, exit code, error file), some 40 lines after the one
`invalid config:` / `error:` line the worker printed. Here, when every failed worker exited by itself
(training/lifecycle.py wrote SAID to its error file: train.py printed its line on the node's first process)
with 1 or 2, or was stopped by SIGTERM/SIGINT (a stop signal during setup, or torchrun closing the others),
nothing more is printed and the launcher exits with the worker's code; one line where no worker can have
said it (all stopped: exit 128 + the signal; or the speaker, local rank 0, stopped by torchrun first).
Anything else is a crash, and torchrun's report stays as it was, with the worker's traceback where it
recorded one (@record, or lifecycle's hook). A stop signal to the launcher itself (torchrun's SignalException,
launch/torchrun.sh's SIGHUP) exits 128 + the signal with the agent's one log line, without a traceback.
"""
from __future__ import annotations

import json
import logging
import signal
import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, record
from torch.distributed.run import get_args_parser, run

from megatron_regdpo.training.lifecycle import SAID

SAID_CODES = (1, 2)            # train.main: 1 after an `error:` line, 2 after `invalid config:`
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# torchrun's log lines about the failure itself; held back until the verdict (shown with a crash's report)
AGENT_LOG = "torch.distributed.elastic.multiprocessing.api"
HELD = ("failed (exitcode", "Sending process", "Closing process")


def _note(failure) -> str | None:
    """What the worker wrote to its error file (training/lifecycle.py), or None."""
    try:
        with open(failure.error_file) as f:
            return json.load(f)["message"]["message"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def quiet_exit(failures: dict) -> tuple[int, str] | None:
    """(exit status, line to print or "") when every failure is a worker that said why it stopped, or one
    stopped by a stop signal; None for a crash."""
    ranks = sorted(failures, key=lambda r: failures[r].timestamp)
    said = [r for r in ranks if failures[r].exitcode in SAID_CODES and _note(failures[r]) == SAID]
    stopped = [r for r in ranks if -failures[r].exitcode in STOP_SIGNALS]
    if len(said) + len(stopped) < len(failures):
        return None
    if said:  # the node's first process says it (train.py), whether torchrun stopped it on its way out or not
        code = failures[said[0]].exitcode
        if any(f.local_rank == 0 and _note(f) == SAID for f in failures.values()):
            return code, ""
        return code, (f"error: {len(said)} worker(s) exited with code {code}; local rank 0, which says why, was "
                      f"stopped before it could: rerun to see the error")
    # torchrun closes the workers still running after the first failure with SIGTERM: a SIGINT is the cause
    sig = signal.SIGINT if any(failures[r].exitcode == -signal.SIGINT for r in stopped) else signal.SIGTERM
    return 128 + sig, (f"error: {len(stopped)} worker(s) stopped by {sig.name} before training started "
                       f"(ranks {', '.join(map(str, sorted(stopped)))}): nothing to save")


class _HoldBack(logging.Filter):
    def __init__(self):
        super().__init__()
        self.held: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and record.msg.startswith(HELD):
            self.held.append(record)
            return False
        return True


def parse_args(argv=None):
    parser = get_args_parser()
    parser.prog = "python -m megatron_regdpo.launcher"
    return parser.parse_args(argv)


@record  # as torchrun's main: a crash's root-cause error file is copied to ours, when we have one
def main(argv=None) -> int:
    args = parse_args(argv)
    logger, hold = logging.getLogger(AGENT_LOG), _HoldBack()
    logger.addFilter(hold)
    quiet = None
    try:
        run(args)
        return 0
    except ChildFailedError as e:
        quiet = quiet_exit(e.failures)
        if quiet is None:
            raise
    except SignalException as e:
        quiet = 128 + e.sigval, ""
    finally:
        logger.removeFilter(hold)
        if quiet is None:
            for held in hold.held:
                logger.handle(held)
    code, line = quiet
    if line:
        print(line, file=sys.stderr, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
