"""Typed errors raised by core code; the service edge maps each class to one gRPC status.

Core code never imports grpc: servers translate these exceptions once, at the boundary.
"""

from __future__ import annotations


class SpeculumError(Exception):
    """Base class of every error Speculum raises on purpose."""


class InvalidArgument(SpeculumError):
    """The request is malformed; `field` names the offending request field (e.g. `sampling.top_p`)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class ResourceExhausted(SpeculumError):
    """A limit (sessions, queue, context) is reached; the client may retry later."""


class Unavailable(SpeculumError):
    """A part of the system (drafter, verifier, encoder, cache) cannot be reached."""


class Unauthenticated(SpeculumError):
    """The call lacks the credentials the public API requires."""


class SessionNotFound(SpeculumError):
    """The session id is unknown: never opened, released, or expired by TTL/eviction."""
