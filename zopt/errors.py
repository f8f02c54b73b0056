"""Errors zopt raises on purpose: each prints as one line naming the file and the problem."""

from __future__ import annotations

import os


class ZoptError(Exception):
    """A user-facing error. ``str(err)`` is ``"<path>: <problem>"`` (or just the problem)."""

    exit_code = 2

    def __init__(self, problem: str, path: str | os.PathLike | None = None):
        self.problem = problem
        self.path = None if path is None else os.fspath(path)
        super().__init__(f"{self.path}: {problem}" if self.path else problem)


class SourceNotFound(ZoptError):
    """The checkpoint path, folder or hub id does not exist."""


class CorruptFile(ZoptError):
    """A header or payload cannot be parsed (truncated, wrong magic, bad JSON...)."""


class UnknownArchitecture(ZoptError):
    """The tensors do not look like a Z-Image transformer."""


class ShapeMismatch(ZoptError):
    """A tensor's shape differs from what the architecture requires."""


class PickleRefused(ZoptError):
    """A pickle checkpoint was given without --allow-pickle."""


class MissingDependency(ZoptError):
    """An optional package is needed: the message says which extra to install."""

    def __init__(self, package: str, extra: str, purpose: str = ""):
        what = f" for {purpose}" if purpose else ""
        super().__init__(f"{package} is needed{what}: pip install 'zopt[{extra}]'")
        self.package = package
        self.extra = extra


class OfflineError(ZoptError):
    """A hub download was needed while offline (or the hub is unreachable)."""


class ChecksumMismatch(ZoptError):
    """A file in an artifact does not match the sha256 recorded in its manifest."""


class UnsupportedFormat(ZoptError):
    """The requested format, type or backend does not exist or cannot run here."""
