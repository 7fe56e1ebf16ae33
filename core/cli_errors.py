"""How every ``gem`` command turns an exception into an exit status and a one-line message.

Errors a user can fix from the message alone are shown without a traceback (unless ``--debug``);
Ctrl-C exits with 130. Each subcommand module calls :func:`guard`; none imports another's.
"""

from __future__ import annotations

import sys
from typing import Callable

from gem.plugins import PluginError
from gem.recipe import RecipeError

__all__ = ["USER_ERRORS", "guard"]

#: Errors a user can fix from the message alone: shown without a traceback unless --debug.
USER_ERRORS = (RecipeError, PluginError, FileNotFoundError, ValueError, ImportError)


def guard(action: Callable[[], int], debug: bool, prog: str) -> int:
    """Run ``action`` and return its exit status; a user error prints ``prog: error: ...`` and gives 2."""
    try:
        return action()
    except KeyboardInterrupt as exc:
        print(f"{prog}: interrupted" + (f": {exc}" if str(exc) else ""), file=sys.stderr)
        return 130
    except USER_ERRORS as exc:
        if debug:
            raise
        print(f"{prog}: error: {exc}", file=sys.stderr)
        print(f"{prog}: run again with --debug for the traceback", file=sys.stderr)
        return 2
