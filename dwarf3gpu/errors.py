"""Project exceptions.

Library code raises these, each with a message that names the problem and the fix in terms of the Python API
(a setting of :class:`~dwarf3gpu.config.StackConfig` or an argument, never a command-line flag); only
:mod:`dwarf3gpu.cli` turns them into a printed message and an exit code, naming the flag of ``setting``.
"""

from __future__ import annotations

__all__ = ["Dwarf3Error", "FitsReadError", "SessionError", "ConfigError", "OutputError", "BackendUnavailableError",
           "Dwarf3Warning"]


class Dwarf3Error(Exception):
    """Base class of every error raised on purpose by dwarf3gpu.

    Parameters
    ----------
    message : str
        The problem and the fix.
    setting : str, optional
        The setting or argument with the bad value (e.g. ``"keep"``, ``"memory_budget"``); the message then reads
        ``"<setting>: <message>"`` and the CLI names the matching flag instead.

    Attributes
    ----------
    exit_code : int
        Exit status the CLI uses for this error (1 = processing failure, 2 = usage).
    setting : str or None
        As given.
    detail : str
        The message without the setting's name.
    """

    exit_code = 1

    def __init__(self, message: str = "", *, setting: str | None = None):
        self.setting = setting
        self.detail = message
        super().__init__(f"{setting}: {message}" if setting else message)


class FitsReadError(Dwarf3Error):
    """A FITS file is missing, truncated, corrupt or not an image.

    Parameters
    ----------
    path : str or os.PathLike
        The offending file.
    problem : str
        What is wrong with it, in plain words.
    """

    def __init__(self, path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class SessionError(Dwarf3Error):
    """A session folder cannot be used (missing, empty, no usable light frames)."""


class ConfigError(Dwarf3Error):
    """An option or a combination of options is invalid."""

    exit_code = 2


class OutputError(Dwarf3Error):
    """An output (or cache) file cannot be written: a file in the way, no permission, a read-only or full disk.

    Parameters
    ----------
    path : str or os.PathLike
        The file or folder that could not be written.
    problem : str
        The cause and the fix, in plain words.
    setting : str, optional
        The setting that chose the place (``"output_root"`` for the output root).
    """

    def __init__(self, path, problem: str, *, setting: str | None = None):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"cannot write {self.path}: {problem}", setting=setting)


class BackendUnavailableError(Dwarf3Error):
    """The requested compute backend (e.g. ``cuda``) cannot run on this machine."""

    exit_code = 3


class Dwarf3Warning(UserWarning):
    """A problem the run recovered from (e.g. a damaged cache entry, discarded and recomputed); the CLI prints it
    as one ``warning:`` line."""
