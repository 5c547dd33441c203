"""Plumbing of the streamed data path (DESIGN.md transport; measured in bench/transport.py).

OutStream: one long-lived ForwardStream call to a receiver, fed from a queue (gRPC's own thread sends): the
coordinator's stream to stage 1.
Subscribers: the Results streams that coordinators hold open on a stage (grpc.aio), by subscriber id.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Generator, Iterator
from typing import TypeVar

import grpc

from splitllm.protos import stage_pb2, stage_pb2_grpc
from splitllm.services.common import trace

log = logging.getLogger("splitllm.streams")
_CLOSE = object()
M = TypeVar("M")


def after_sent(items: Generator[tuple[M, Callable[[], None] | None], None, None]) -> Iterator[M]:
    """AFTER_SENT: the messages of a stream that gRPC's sync API sends, each with the work it leaves for after it
    has been sent (the coordinator: that a step went out). That work runs in the sending thread when gRPC asks
    for the next message, which it does once this one is sent, or when the stream ends with the message in flight.
    A stage's Results streams do the same on its event loop (Subscribers.stream)."""
    after = None
    try:
        for message, after in items:
            yield message
            if after is not None:
                after, run = None, after
                run()
    finally:
        if after is not None:
            after()
        items.close()


class OutStream:
    """Sends ForwardRequests on one ForwardStream call; a broken call is replaced on the next send."""

    def __init__(self, stub: stage_pb2_grpc.StageStub, address: str,
                 on_sent: Callable[[float, stage_pb2.ForwardRequest], None] | None = None,
                 on_break: Callable[[str, set[str]], None] | None = None) -> None:
        """`on_break(address, reply_to)`: the call broke; reply_to holds the requests' reply_to values."""
        self.stub, self.address, self.on_sent, self.on_break = stub, address, on_sent, on_break
        self.lock = threading.Lock()
        self.queue: queue.SimpleQueue | None = None
        self.call: grpc.Future | None = None
        self.reply_to: set[str] = set()  # of the requests sent on the current call

    def _requests(self, q: queue.SimpleQueue) -> Generator[tuple[stage_pb2.ForwardRequest, Callable[[], None] | None],
                                                            None, None]:
        """The call's requests (through after_sent) until close or a broken call puts _CLOSE."""
        while (item := q.get()) is not _CLOSE:
            req, t, after = item
            if self.on_sent:
                self.on_sent(time.perf_counter() - t, req)
            trace.event(req.step_id, "sent")
            yield req, after

    def _broken(self, call: grpc.Future) -> None:
        with self.lock:
            if self.call is not call:
                return
            q, self.call, self.queue = self.queue, None, None
            reply_to, self.reply_to = self.reply_to, set()
        q.put(_CLOSE)  # lets gRPC's request-consuming thread of the dead call end
        err = call.exception() if not call.cancelled() else None
        if err is not None:
            log.warning("stream to %s broke: %s", self.address, getattr(err, "code", lambda: err)())
            if self.on_break:
                self.on_break(self.address, reply_to)

    def send(self, request: stage_pb2.ForwardRequest, after: Callable[[], None] | None = None) -> None:
        """Queue `request`; gRPC's sending thread runs `after` once it is sent (AFTER_SENT)."""
        with self.lock:
            new = self.call is None
            if new:
                self.queue = queue.SimpleQueue()
                self.call = self.stub.ForwardStream.future(after_sent(self._requests(self.queue)))
            call = self.call
            self.reply_to.add(request.reply_to)
            self.queue.put((request, time.perf_counter(), after))
        if new:  # outside the lock: a call that failed already runs _broken right here
            call.add_done_callback(self._broken)

    def close(self) -> None:
        with self.lock:
            if self.queue is not None:
                self.queue.put(_CLOSE)
            self.call = self.queue = None
            self.reply_to = set()


class Subscribers:
    """Results streams by subscriber id, where answers and per-step errors are pushed; on a stage's event loop."""

    def __init__(self) -> None:
        self.queues: dict[str, asyncio.Queue] = {}

    def push(self, subscriber_id: str, response: stage_pb2.ForwardResponse,
             after: Callable[[], None] | None = None) -> bool:
        """Queue `response` on the subscriber's stream, whose writer runs `after` once it is sent (AFTER_SENT), or
        at once when there is no such subscriber."""
        q = self.queues.get(subscriber_id)
        if q is not None:
            q.put_nowait((response, after))
            return True
        log.warning("no Results subscriber %r for step %d", subscriber_id, response.step_id)
        if after is not None:
            after()
        return False

    async def stream(self, subscriber_id: str) -> AsyncIterator[stage_pb2.ForwardResponse]:
        """The body of a Results call: confirm (step_id 0), then the pushed messages until the call ends. gRPC
        resumes the generator once the last message is sent, which is when that message's `after` runs; when
        the call ends, the message in flight and those still queued run theirs."""
        q: asyncio.Queue = asyncio.Queue()
        self.queues[subscriber_id] = q
        after = None
        try:
            yield stage_pb2.ForwardResponse(step_id=0)
            while True:
                response, after = await q.get()
                trace.event(response.step_id, "answered")
                yield response
                after, run = None, after
                if run is not None:
                    run()
        finally:
            if self.queues.get(subscriber_id) is q:
                del self.queues[subscriber_id]
            if after is not None:
                after()
            while not q.empty():
                _, after = q.get_nowait()
                if after is not None:
                    after()
