"""One exception family for everything a user can get wrong or run into.

Messages say what is wrong and what to do. The UI shows them in the tab, the CLI prints them and
exits with status 2. Anything that is not a MergeError is a bug of ours.
"""


class MergeError(Exception):
    """Base of every error that is meant for the user."""


class InputError(MergeError):
    """A file or value given by the user cannot be used (missing, not a model, bad option)."""


class CorruptFileError(InputError):
    """A model file is truncated, damaged or lies about its own contents."""


class UnsafeFileError(InputError):
    """A pickle that would run code, or anything else we refuse to load for safety."""


class UnsupportedModelError(InputError):
    """A model family or file kind that Merge Lab does not merge."""


class ArchitectureMismatchError(InputError):
    """Models of different architectures were asked to be merged together."""


class OutputError(MergeError):
    """The result cannot be written where asked (bad name, overwrite of an input, no space)."""


class DiskFullError(OutputError):
    """Not enough free space for the output file."""


class NonFiniteError(MergeError):
    """The merge produced NaN or Inf values and the policy says to stop."""


class CancelledError(MergeError):
    """The user pressed Interrupt (or the caller cancelled); nothing was written."""
