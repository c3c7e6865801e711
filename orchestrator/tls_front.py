"""A TLS front for the public API, because Ray Serve's gRPC proxy only speaks plaintext.

Ray Serve 2.60's `gRPCOptions` has no TLS fields and its proxy binds with `add_insecure_port`
(ray/serve/_private/default_impl.py). When a certificate is configured, this relay terminates TLS
on the public port and forwards every call, bytes unchanged, to the proxy on a loopback port:
metadata (`application`, `authorization`, `traceparent`), the deadline and cancellation go
upstream; the status, details and trailing metadata come back. In a cluster, an ingress or service
mesh that terminates TLS does the same job without this extra hop (see README).

Which methods exist and how they stream is read from the protobuf descriptors imported here (the
public API and server reflection); anything else is UNIMPLEMENTED.
"""

from __future__ import annotations

import logging
from concurrent import futures
from pathlib import Path

import grpc
from google.protobuf import descriptor_pool
from grpc_reflection.v1alpha import reflection_pb2  # noqa: F401 (registers the reflection service)

from speculum.rpc.settings import TlsServerSettings, message_options
from speculum.v1 import speculum_pb2  # noqa: F401 (registers the public service)

log = logging.getLogger("speculum.tls_front")

_NO_DEADLINE_S = 10**7  # remaining times beyond this mean the caller set no deadline
# Transport-level headers that the channel sets itself.
_NOT_FORWARDED = ("user-agent", "content-type", "te", "grpc-")


def _forwarded(metadata) -> tuple[tuple[str, str | bytes], ...]:
    return tuple((key, value) for key, value in metadata or () if not key.startswith(":")
                 and not any(key == skip or (skip.endswith("-") and key.startswith(skip)) for skip in _NOT_FORWARDED))


def _streaming(method: str) -> tuple[bool, bool] | None:
    """(client_streaming, server_streaming) of `/package.Service/Method`, or None if unknown."""
    try:
        found = descriptor_pool.Default().FindMethodByName(method.lstrip("/").replace("/", "."))
    except KeyError:
        return None
    return found.client_streaming, found.server_streaming


class _Relay(grpc.GenericRpcHandler):
    def __init__(self, channel: grpc.Channel):
        self._channel = channel

    def service(self, details: grpc.HandlerCallDetails):
        kind = _streaming(details.method)
        if kind is None:
            return None
        method = details.method
        if kind == (False, False):
            return grpc.unary_unary_rpc_method_handler(lambda request, context: self._unary(method, request, context))
        if kind == (False, True):
            return grpc.unary_stream_rpc_method_handler(lambda request, context: self._stream(
                self._channel.unary_stream(method), request, context))
        if kind == (True, True):
            return grpc.stream_stream_rpc_method_handler(lambda requests, context: self._stream(
                self._channel.stream_stream(method), requests, context))
        return grpc.stream_unary_rpc_method_handler(lambda requests, context: self._unary(
            method, requests, context, client_streaming=True))

    @staticmethod
    def _call_options(context) -> dict:
        remaining = context.time_remaining()  # a call without a deadline reports an "infinite" one
        timeout = remaining if remaining is not None and remaining < _NO_DEADLINE_S else None
        return {"metadata": _forwarded(context.invocation_metadata()), "timeout": timeout}

    def _unary(self, method: str, request, context, client_streaming: bool = False):
        multi = (self._channel.stream_unary if client_streaming else self._channel.unary_unary)(method)
        future = multi.future(request, **self._call_options(context))
        context.add_callback(future.cancel)  # the client went away: so does the upstream call
        try:
            response = future.result()
        except grpc.RpcError as exc:
            context.set_trailing_metadata(exc.trailing_metadata() or ())
            context.abort(exc.code(), exc.details() or "")
        except grpc.FutureCancelledError:
            context.abort(grpc.StatusCode.CANCELLED, "cancelled")
        context.set_trailing_metadata(future.trailing_metadata() or ())
        return response

    def _stream(self, multi, request, context):
        call = multi(request, **self._call_options(context))
        context.add_callback(call.cancel)
        try:
            yield from call
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.CANCELLED and not context.is_active():
                return
            context.set_trailing_metadata(call.trailing_metadata() or ())
            context.abort(exc.code(), exc.details() or "")
        context.set_trailing_metadata(call.trailing_metadata() or ())


class TlsFront:
    """`TlsFront(upstream, tls, port).start()` serves TLS on `host:port` in front of `upstream`."""

    def __init__(self, upstream: str, tls: TlsServerSettings, port: int, host: str = "127.0.0.1",
                 max_message_bytes: int = 64 * 1024 * 1024, max_workers: int = 32):
        options = message_options(max_message_bytes)
        self._channel = grpc.insecure_channel(upstream, options)
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers, thread_name_prefix="tls-front"),
                                   handlers=[_Relay(self._channel)], options=options)
        credentials = grpc.ssl_server_credentials([(Path(tls.key_path).read_bytes(), Path(tls.cert_path).read_bytes())])
        self.port = self._server.add_secure_port(f"{host}:{port}", credentials)
        self.upstream = upstream

    def start(self) -> TlsFront:
        self._server.start()
        log.info("TLS front on port %d for %s", self.port, self.upstream)
        return self

    def stop(self, grace_s: float = 1.0) -> None:
        self._server.stop(grace_s).wait()
        self._channel.close()
