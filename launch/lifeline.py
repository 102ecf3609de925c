"""How eosrl processes end: on SIGTERM or Ctrl-C the clean way (`stop_on_signals`),
and, for children of a launcher, when their launcher is gone (`watch_parent`).

The local launcher and the study runner start each child in a session of its
own (so a terminal's Ctrl-C reaches only the launcher, which then stops the
children in a safe order). The price is that a launcher killed with SIGKILL
would leave them running with parent 1: a replay server listening for ever, an
evaluator polling for ever. So the launcher names itself in the child's
environment, and the child watches its parent: once the parent is no longer
that process, the child stops the clean way (SIGTERM to itself: the learner
writes its checkpoint, the replay server its table checkpoint) and, should that
not finish within `grace_s`, exits hard.
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from typing import Dict, Iterator, Mapping, Optional

PARENT_PID = "EOSRL_PARENT_PID"
EXIT_ORPHANED = 4


def child_environment(env: Mapping[str, str]) -> Dict[str, str]:
    """`env` plus this process as the parent that the child must outlive no longer."""
    return {**env, PARENT_PID: str(os.getpid())}


def watch_parent(delay_s: float = 0.0, poll_s: float = 1.0, grace_s: float = 10.0) -> bool:
    """In a child started with `child_environment`: a daemon thread that stops this
    process `delay_s` after its parent has gone. False (and nothing started) elsewhere.
    The replay server waits a little, as under the launcher: the learner's final
    checkpoint asks it for a replay snapshot."""
    expected = os.environ.pop(PARENT_PID, "")  # grandchildren have parents of their own
    if not expected.isdigit():
        return False
    parent = int(expected)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        time.sleep(delay_s)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace_s)
        os._exit(EXIT_ORPHANED)

    threading.Thread(target=watch, name="eosrl-lifeline", daemon=True).start()
    return True


class Stop(KeyboardInterrupt):
    """Raised in the main thread by SIGTERM or SIGINT inside `stop_on_signals`, so a run
    unwinds through its `finally` blocks (final checkpoint, records) whichever came.
    A KeyboardInterrupt, so Ctrl-C and `kill` are handled by the same `except`."""


class Signals:
    """What `stop_on_signals` has received, to tell a stop from a failure.

    A signal's `Stop` can surface as another error: when the handler runs inside Python
    code that C++ calls while building an exception of its own (TF's status error raised
    by a Reverb dataset), pybind11 replaces both with `RuntimeError: ... MISMATCH of
    original and normalized active exception types ... REPLACED BY Stop`. A learner that
    took that for a failure, or let it through its `except Stop`, recorded a run stopped
    by its launcher as `completed`."""

    def __init__(self) -> None:
        self.received: Optional[int] = None

    def stopped(self, error: BaseException) -> bool:
        """Whether `error` is how a stop signal surfaced (any error once one was received)."""
        return isinstance(error, Stop) or (self.received is not None and isinstance(error, Exception))


@contextlib.contextmanager
def stop_on_signals() -> Iterator[Signals]:
    """SIGTERM (`kill`, a scheduler, a launcher) and SIGINT (Ctrl-C) both raise `Stop`.
    SIGINT is set explicitly: a process started in the background by a script
    (`eosrl launch ... &`) inherits SIGINT ignored, and Python then installs no Ctrl-C
    handler. Outside the main thread (a Ray worker) nothing is installed: the launcher
    ends the role instead. Only the first signal raises: one that comes while the run
    is cleaning up (its final checkpoint) is ignored, so put the clean-up inside the block.
    Catch with `except BaseException as error` and `signals.stopped(error)` where C++
    calls run inside the block (see `Signals`)."""
    signals = Signals()

    def handler(signum, frame):
        if signals.received is None:
            signals.received = signum
            raise Stop()
    try:
        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    except ValueError:
        previous = {}
    try:
        yield signals
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
