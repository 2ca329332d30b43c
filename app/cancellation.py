"""Stop the work of a request whose client has gone away (issue 15: no request may keep the
database busy for nobody).

A search, or a batch of them, can be expensive; a client that gives up (a timeout, a closed
app) would otherwise leave its statements running to the end. :class:`CancelOnDisconnect`
watches the connection of every FHIR request and cancels its handler when the client
disconnects: asyncpg then cancels the running statement on the server (a CancelRequest), a
write's transaction rolls back, and the connection goes back to the pool. Nothing the client
was told succeeded is undone: a write commits before its response is sent, and a client that
disconnected before the response learns nothing either way (as after any network failure).

The middleware owns the ASGI ``receive`` channel: one task reads it and hands the request's
messages to the application through a one-slot queue (so a large form body is not read ahead
of the application's own size limit), then keeps listening for ``http.disconnect``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger("carecoord")


def _cancellable(scope: Scope) -> bool:
    path: str = scope.get("path", "")
    return path == "/fhir" or path.startswith("/fhir/")


class CancelOnDisconnect:
    """ASGI middleware: a FHIR request is cancelled when its client disconnects."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not _cancellable(scope):
            await self.app(scope, receive, send)
            return
        request_task = asyncio.current_task()
        assert request_task is not None
        messages: asyncio.Queue[Message] = asyncio.Queue(maxsize=1)
        client_gone = False
        answered = False

        async def pump() -> None:
            nonlocal client_gone
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    # After the whole response, a server reports the end of the exchange this way
                    # too: only a client that left before its answer cancels the work.
                    if not answered:
                        client_gone = True
                        request_task.cancel()
                    return
                await messages.put(message)

        async def app_send(message: Message) -> None:
            nonlocal answered
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                answered = True

        reader = asyncio.create_task(pump())
        try:
            await self.app(scope, messages.get, app_send)
        except asyncio.CancelledError:
            if not client_gone:
                raise  # the server is shutting down, say: not ours to swallow
            request_task.uncancel()
            logger.info("client gone: cancelled %s %s", scope.get("method"), scope.get("path"))
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
