"""ttrpc status codes (gRPC numbering) and the exceptions that carry them."""

from __future__ import annotations

import enum


class Code(enum.IntEnum):
    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


def code_of(value: int) -> Code | int:
    """A Code for a known number; unknown numbers from a peer are kept as plain ints."""
    try:
        return Code(value)
    except ValueError:
        return value


class TtrpcError(Exception):
    """An RPC failed with a status code.

    Handlers raise it to answer with that code; the client raises it for error statuses.
    """

    def __init__(self, code: Code | int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        name = self.code.name if isinstance(self.code, Code) else str(self.code)
        return f"{type(self).__name__}({name}, {self.message!r})"


class ConnectionClosed(TtrpcError):
    """The connection is closed or the peer went away (Go's `ttrpc: closed`)."""

    def __init__(self, message: str = "ttrpc: closed") -> None:
        super().__init__(Code.UNAVAILABLE, message)
