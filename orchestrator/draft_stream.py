"""One long-lived DraftRounds stream per draft session: a round is a message, not a new call.

Setting up a gRPC call costs about as much as a small drafter forward on CPU, so the session keeps
one bidirectional stream: each round writes a DraftRequest and reads pieces until one marked
end-of-round (the last piece, or a bare marker). A reader thread moves responses into a queue, so a
round can wait with a deadline: a drafter that stalls past it, or a stream that breaks, fails the
round (and the stream) with the typed error, exactly as a per-round call would.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

import grpc

from speculum.errors import Unavailable
from speculum.v1 import drafter_pb2, drafter_pb2_grpc

_CLOSE = object()  # ends the request stream
_ENDED = object()  # the response stream ended


class DraftRoundStream:
    """The stream of one draft session; opened on the first round, closed with the session."""

    def __init__(self, stub: drafter_pb2_grpc.DrafterStub):
        self._stub = stub
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._call = None

    def round(self, request: drafter_pb2.DraftRequest, deadline_s: float) -> Iterator[drafter_pb2.DraftBlock]:
        """The pieces of one round. Raises grpc.RpcError from the stream, or Unavailable when the
        round outlasts `deadline_s` or the stream is gone (the stream is then cancelled)."""
        if self._call is None:
            self._open()
        self._outbox.put(request)
        while True:
            try:
                item = self._inbox.get(timeout=deadline_s)
            except queue.Empty:
                self.cancel()
                raise Unavailable(f"DEADLINE_EXCEEDED: no draft within the round's {deadline_s:g} s") from None
            if isinstance(item, grpc.RpcError):
                raise item
            if item is _ENDED:
                raise Unavailable("the drafter closed the stream")
            if item.HasField("block"):
                yield item.block
            if item.end_of_round:
                return

    def close(self) -> None:
        """End the request stream; the drafter finishes the call on its side."""
        if self._call is not None:
            self._outbox.put(_CLOSE)

    def cancel(self) -> None:
        if self._call is not None:
            self._call.cancel()

    def _open(self) -> None:
        self._call = self._stub.DraftRounds(iter(self._outbox.get, _CLOSE))
        threading.Thread(target=self._read, name="draft-stream", daemon=True).start()

    def _read(self) -> None:
        try:
            for piece in self._call:
                self._inbox.put(piece)
            self._inbox.put(_ENDED)
        except grpc.RpcError as exc:
            self._inbox.put(exc)
