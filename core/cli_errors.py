"""How every ``gem`` command turns an exception into an exit status and a one-line message.

gem's own errors (:class:`gem.errors.GemError` and its subclasses: a bad recipe, an unknown
plugin, missing or unusable data, an oracle that cannot work as configured, a bad command-line
argument) are shown as one line without a traceback (unless ``--debug``) and give status 2. Any
other exception is a bug and goes up with its traceback. Ctrl-C exits with 130. A reader that
closes the output early (``gem plugins --json | head -1``) ends the command quietly with status 0.
Each subcommand module calls :func:`guard`; none imports another's.
"""

from __future__ import annotations

import os
import sys
from typing import Callable

from gem.errors import GemError

__all__ = ["USER_ERRORS", "guard"]

#: Errors a user can fix from the message alone: shown without a traceback unless --debug.
USER_ERRORS = (GemError,)


def guard(action: Callable[[], int], debug: bool, prog: str) -> int:
    """Run ``action`` and return its exit status; a user error prints ``prog: error: ...`` and gives 2."""
    try:
        status = action()
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        return status
    except KeyboardInterrupt as exc:
        print(f"{prog}: interrupted" + (f": {exc}" if str(exc) else ""), file=sys.stderr)
        return 130
    except BrokenPipeError:
        if not _stdout_closed():  # another pipe (a worker process, a socket): a real failure
            raise
        _silence_stdout()
        return 0
    except USER_ERRORS as exc:
        if debug:
            raise
        print(f"{prog}: error: {exc}", file=sys.stderr)
        print(f"{prog}: run again with --debug for the traceback", file=sys.stderr)
        return 2


def _stdout_closed() -> bool:
    """Whether standard output is a pipe whose reader has gone (poll reports an error on it)."""
    try:
        import select

        fd = sys.stdout.fileno()
        poller = select.poll()
    except (AttributeError, ImportError, OSError, ValueError):  # no poll (Windows) or no real stdout
        return False
    poller.register(fd, select.POLLOUT)
    return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))


def _silence_stdout() -> None:
    """Point standard output at the null device, so that the flush at exit cannot fail again
    (what the Python documentation recommends for SIGPIPE / BrokenPipeError)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)
