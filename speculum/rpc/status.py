"""Core errors -> gRPC status codes, mapped once for every servicer method."""

from __future__ import annotations

import functools
import inspect
import logging

import grpc

from speculum.errors import (
    InvalidArgument,
    ResourceExhausted,
    SessionNotFound,
    SpeculumError,
    Unauthenticated,
    Unavailable,
)

log = logging.getLogger("speculum.rpc")

CODES: dict[type[SpeculumError], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    SessionNotFound: grpc.StatusCode.NOT_FOUND,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
}


def code_for(error: SpeculumError) -> grpc.StatusCode:
    for cls in type(error).__mro__:
        if cls in CODES:
            return CODES[cls]
    return grpc.StatusCode.INTERNAL


def mapped(method):
    """Wrap a servicer method (unary or server-streaming) so typed errors abort with their status."""
    if inspect.isgeneratorfunction(method):

        @functools.wraps(method)
        def streaming(self, request, context):
            try:
                yield from method(self, request, context)
            except SpeculumError as exc:
                context.abort(code_for(exc), str(exc))

        return streaming

    @functools.wraps(method)
    def unary(self, request, context):
        try:
            return method(self, request, context)
        except SpeculumError as exc:
            context.abort(code_for(exc), str(exc))

    return unary


def error_from_rpc(exc: grpc.RpcError) -> SpeculumError:
    """The typed error matching a failed call's status (clients re-raise core errors)."""
    code, details = exc.code(), exc.details() or ""
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        field, _, message = details.partition(": ")
        return InvalidArgument(field, message or details)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return ResourceExhausted(details)
    if code == grpc.StatusCode.NOT_FOUND:
        return SessionNotFound(details)
    return Unavailable(f"{code.name}: {details}")
