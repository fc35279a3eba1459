"""`python -m blockgraph.trainer JOB.json [FD]`: what `train --nproc N` starts in every process (see
trainer.distributed).

Before anything slow (importing torch takes seconds), the worker ties its life to the launcher's: it dies with
it (Linux: PR_SET_PDEATHSIG; everywhere: FD, the read end of a pipe only the launcher holds open, reads
end-of-file). A stop signal ends it at once while it is still starting (importing), and from then on asks for
a stop, which the ranks carry out together at a step (trainer.distributed). Whatever ends it, a worker prints
no traceback: an error the user can fix is reported as such, a stop is quiet (the launcher says where the last
checkpoint is), and so is the failure of a worker whose peer ended first.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any

FOLLOW_S = 2.0  # how long a failed worker waits to learn (from the launcher) that a peer ended before it


def _stopped_while_starting(signum: int, frame: Any) -> None:
    os._exit(130)  # distributed.STOPPED: nothing begun yet, nothing to finish


def _tie_to_launcher(fd: int) -> None:
    """End this process (and what it started) as soon as the launcher ends, however it ends."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: no GIL needed
    threading.Thread(target=_watch, args=(fd,), name="launcher-watch", daemon=True).start()


def _watch(fd: int) -> None:
    try:
        while os.read(fd, 1):  # the launcher never writes: this returns b"" when it has ended
            pass
    finally:
        if os.getpgrp() == os.getpid():  # a session's leader, as the launcher starts it: with what it started
            os.killpg(os.getpid(), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)


def main() -> int:
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _stopped_while_starting)
    args = sys.argv[1:]
    if not 1 <= len(args) <= 2 or (len(args) == 2 and not args[1].isdigit()):
        print(
            "usage: python -m blockgraph.trainer JOB.json [FD] (written by `blockgraph train --nproc N`)",
            file=sys.stderr,
        )
        return 2
    if len(args) == 2:
        _tie_to_launcher(int(args[1]))

    from rich.markup import escape

    from blockgraph.builder.plugins import activate
    from blockgraph.common.console import err, report
    from blockgraph.common.errors import BlockgraphError, UsageError
    from blockgraph.common.files import FileKind, MiB
    from blockgraph.common.records import check_record, read_record
    from blockgraph.trainer import distributed
    from blockgraph.trainer.config import TrainConfig
    from blockgraph.trainer.loop import train

    distributed.catch_stop_signals()
    debug = False
    try:
        kind = FileKind("training job", UsageError, limit=16 * MiB)
        job = read_record(args[0], distributed.Job, kind)
        debug = job.debug
        config = check_record(job.config, TrainConfig, kind, args[0], field="config")
        activate(job.plugins)  # the blocks the launcher had: named by the user who started it
        train(config, job.out, resume=job.resume, quiet=job.quiet, locked=job.locked)
    except KeyboardInterrupt:  # distributed.Stopped: every rank stops at the same step
        return distributed.STOPPED
    except BlockgraphError as error:
        if distributed.wait_for_stop(FOLLOW_S):  # a peer ended first (its error is the one to see)
            return distributed.STOPPED
        report(error)
        return 1
    except Exception as exc:
        if distributed.wait_for_stop(FOLLOW_S):
            return distributed.STOPPED
        if debug:
            raise
        rank = os.environ.get("RANK", "?")  # the exception's text is not shown: it may quote a file's contents
        err.print(f"[bold red]error:[/] process {rank} failed: {escape(type(exc).__name__)}")
        err.print("  hint: `blockgraph --debug train ...` shows where", style="green", markup=False)
        return distributed.FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main())
