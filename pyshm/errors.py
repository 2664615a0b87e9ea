"""The exceptions pyshm raises.  Each names what went wrong and what to do."""
from __future__ import annotations


class PyshmError(Exception):
    """Base class of every pyshm error."""

    #: What `pyshm` exits with when this error stops it.
    exit_status = 1


class ClosureError(PyshmError, TypeError):
    """An object graph reaches something that cannot be shared.

    The message starts with the path to the offending reference,
    e.g. ``root['db']._sock``.
    """


class ClosureReleased(PyshmError):
    """A mapped view was used after its snapshot was released."""


class HeapFull(PyshmError, MemoryError):
    """The heap segment cannot hold the new version."""


class HeapCorrupt(PyshmError):
    """A consistency check or bounds check failed."""


class SegmentError(PyshmError, OSError):
    """A shared-memory segment could not be created, attached or used."""


class SegmentNotFound(SegmentError, FileNotFoundError):
    """No segment of that name exists."""


class SegmentExists(SegmentError, FileExistsError):
    """A segment of that name already exists."""


class LayoutMismatch(SegmentError):
    """The segment was written by another layout version of pyshm."""


class ClosureNotFound(PyshmError, KeyError):
    """No closure of that name is in the heap."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class PinLimit(PyshmError):
    """This process holds too many snapshots of distinct versions at once."""


class ReaderTableFull(PyshmError):
    """Too many processes are attached to the heap."""


class DirectoryFull(PyshmError):
    """The heap's directory has no room for another name."""


class SessionTableFull(PyshmError):
    """Every entry of the session table is taken."""


class StaleWorker(PyshmError):
    """This worker's index was given to another process (the manager thinks
    it died): it must stop."""


class SessionLost(PyshmError):
    """The session's endpoint cannot go on (not restorable after its worker
    died, or the session ended)."""


class UnknownMethod(LookupError):
    """An RPC call names no function or endpoint method the application
    registered (the client hears it as an error)."""


class ConfigError(PyshmError, ValueError):
    """The configuration is invalid; the message names the key."""


class StartupError(PyshmError):
    """An instance could not start serving (exit status 2)."""

    exit_status = 2


class ListenError(StartupError):
    """A listener's address cannot be bound (in use, not this machine's, ...)."""


class WorkerStartError(StartupError):
    """Workers did not start: the instance cannot serve."""
