"""The errors gem raises for things a user can fix from the message alone.

Every one derives from :class:`GemError`; ``gem`` and ``gem-run`` print such an error as one line
(``prog: error: ...``, exit status 2) and let anything else through with its traceback, since
any other exception is a bug (see :mod:`gem.cli_errors`). Each class is also a subclass of the
built-in error it used to be (``ValueError``, ``FileNotFoundError``, ``ImportError``), so
``except ValueError`` keeps catching it.

Where they live: this module (no heavy imports, so every module and plugin can raise them)
holds the general ones; the others derive from :class:`GemError` where they are raised:
:class:`gem.recipe.RecipeError`, :class:`gem.plugins.PluginError`,
:class:`gem.data.MissingDataError`, :class:`gem.run_folder.RunFolderError`,
:class:`gem.training.CheckpointError`, :class:`gem.training.NonFiniteLossError` and the oracle
plugins' ``OracleError``. A plugin of another package raises these (or subclasses of
:class:`GemError`) for a mistake in its options or data; a plain ``ValueError`` prints a traceback.
"""

from __future__ import annotations

__all__ = ["GemError", "ConfigurationError", "DataError", "MissingDependencyError", "RunFolderContentError"]


class GemError(Exception):
    """Base of every error a user can fix from the message alone (printed without a traceback)."""


class ConfigurationError(GemError, ValueError):
    """A setting is invalid: a command-line argument, a recipe value, or options that do not fit
    together or the data (:class:`gem.recipe.RecipeError` is one, for recipe keys)."""


class DataError(GemError, ValueError):
    """The data set is empty or unusable: a file in the wrong format, labels that do not fit the
    images (a missing data set is :class:`gem.data.MissingDataError`)."""


class MissingDependencyError(GemError, ModuleNotFoundError):
    """An optional package is not installed; the message says what to install."""


class RunFolderContentError(GemError, ValueError):
    """A run folder's files cannot be read or do not fit together (a missing file is
    :class:`gem.run_folder.RunFolderError`)."""
