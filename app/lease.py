"""A request's database connection, taken at its first statement (issue 14, "connections only
when needed").

The pool holds few connections (``CARECOORD_DB_POOL_MAX``); every request that holds one while
it reads, parses or validates its body, or while it renders a large response, keeps another
request waiting for nothing. A :class:`ConnectionLease` is what a request's repository starts
with instead of a connection: the pool connection is acquired, and a writing request's
transaction begun, when the first statement needs it. A request refused before that (a
malformed body, a resource that fails validation, a 403 judged from the token alone) never
touches the pool.

The request that opened the lease ends it with :meth:`finish`: commit or roll back the
transaction if one was begun, and give the connection back.
"""

from __future__ import annotations

import asyncio

from asyncpg import Connection, Pool
from asyncpg.transaction import Transaction


class ConnectionLease:
    """A pool connection acquired on first use; with ``transaction`` its statements run in one
    transaction begun right after the connection is taken."""

    def __init__(self, pool: Pool, *, transaction: bool) -> None:
        self._pool = pool
        self._transactional = transaction
        self._connection: Connection | None = None
        self._transaction: Transaction | None = None
        self._taking = asyncio.Lock()

    @property
    def taken(self) -> bool:
        """Whether a statement has needed the connection yet."""
        return self._connection is not None

    async def connection(self) -> Connection:
        """The request's connection, acquired (and its transaction begun) the first time."""
        if self._connection is not None:
            return self._connection
        # Concurrent first uses (a handler gathering two reads) must not take two connections.
        async with self._taking:
            if self._connection is None:
                connection: Connection = await self._pool.acquire()
                if self._transactional:
                    transaction = connection.transaction()
                    try:
                        await transaction.start()
                    except BaseException:
                        await self._pool.release(connection)
                        raise
                    self._transaction = transaction
                self._connection = connection
        return self._connection

    async def finish(self, *, commit: bool) -> None:
        """Commit (or roll back) the transaction, if one was begun, and release the connection.
        A commit that fails raises after the connection is released."""
        connection, transaction = self._connection, self._transaction
        self._connection = self._transaction = None
        if connection is None:
            return
        try:
            if transaction is not None:
                if commit:
                    await transaction.commit()
                else:
                    await transaction.rollback()
        finally:
            await self._pool.release(connection)
