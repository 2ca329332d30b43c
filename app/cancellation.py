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
        messages: asyncio.Queue[Message] = asyncio.Queue(maxsize=1)
        disconnected = asyncio.Event()

        async def pump() -> None:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    disconnected.set()
                await messages.put(message)
                if message["type"] == "http.disconnect":
                    return

        async def app_receive() -> Message:
            return await messages.get()

        async def run() -> None:
            await self.app(scope, app_receive, send)

        handler = asyncio.create_task(run())
        reader = asyncio.create_task(pump())
        watcher = asyncio.create_task(disconnected.wait())
        try:
            await asyncio.wait({handler, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if not handler.done():
                logger.info("client gone: cancelling %s %s", scope.get("method"), scope.get("path"))
                handler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await handler
        finally:
            for task in (reader, watcher, handler):
                task.cancel()
            for task in (reader, watcher):
                with contextlib.suppress(asyncio.CancelledError):
                    await task
