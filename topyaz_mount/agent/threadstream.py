"""The ssh channel as a trio stream over two blocking file descriptors, moved by threads.

trio waits on pipes without threads only where the OS lets it (``FdStream`` on POSIX).
A Windows agent's stdin and stdout are plain, non-overlapped pipe handles, which trio
has no stream over, so there the channel is this one (``hostos.channel`` chooses it;
``TOPYAZ_MOUNT_PORTABLE=1`` chooses it on Linux too, which is how the tests run it):
one daemon thread reads ahead into a one-slot queue, and each ``send_all`` writes in a
worker thread.

Why it is shaped so:

- A read that never returns must not keep the agent from exiting: the reader is a
  daemon thread and nothing ever waits for it.
- A cancelled ``receive_some`` loses no bytes: what the reader got waits in the queue.
- A cancelled ``send_all`` leaves its write running to the end in its (abandoned)
  thread, and every later write or ``send_eof`` waits for it, so the peer never sees
  bytes torn or out of order.
- An fd is closed only when no read or write is in flight on it: on Windows a close
  waits for the C runtime's per-fd lock a blocked read holds, and on POSIX the number
  could be reused under a write that is still looping. ``aclose`` therefore closes
  what is idle and leaves the rest to the thread that holds it.
"""

from __future__ import annotations

import errno
import os
import threading
from typing import Union

import trio

CHUNK = 1 << 18  # bytes a read asks for: what the rpc reader asks of the stream
WRITE_STEP = 1 << 20  # bytes a write hands over at most: a close stops the rest


class ThreadedStream(trio.abc.HalfCloseableStream):
    """Receives from ``read_fd`` and sends to ``write_fd``; both fds become ours."""

    def __init__(self, read_fd: int, write_fd: int, chunk: int = CHUNK) -> None:
        self._read_fd = read_fd
        self._chunk = chunk
        # The reader's chunks, an OSError, or the channel closed at end of file.
        self._to_queue, self._queue = trio.open_memory_channel[Union[bytes, OSError]](1)
        self._reader: threading.Thread | None = None
        self._leftover = memoryview(b"")  # a chunk bigger than what receive_some asked
        self._read_error: OSError | None = None
        self._receiving = False
        self._write_fd: int | None = write_fd
        self._write_lock = threading.Lock()  # one write at a time, abandoned ones too
        self._state = threading.Lock()  # guards _write_fd, _writing, _write_closing
        self._writing = False
        self._write_closing = False
        self._sending = False  # a send_all or send_eof of ours is running
        self._send_scope: trio.CancelScope | None = None
        self._eof_sent = False
        self._closed = False

    # --- receiving --------------------------------------------------------------------

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if max_bytes is not None and max_bytes < 1:
            raise ValueError("max_bytes must be at least 1")
        if self._receiving:
            raise trio.BusyResourceError("another task is receiving from this stream")
        self._receiving = True
        try:
            if self._closed:
                raise trio.ClosedResourceError("the stream was closed")
            if self._read_error is not None:
                raise trio.BrokenResourceError(str(self._read_error)) from self._read_error
            if self._leftover:
                await trio.lowlevel.checkpoint()
            else:
                self._start_reader()
                try:
                    item = await self._queue.receive()
                except trio.EndOfChannel:
                    return b""
                if isinstance(item, OSError):
                    self._read_error = item
                    raise trio.BrokenResourceError(str(item)) from item
                if max_bytes is None or len(item) <= max_bytes:
                    return item
                self._leftover = memoryview(item)
            size = len(self._leftover) if max_bytes is None else max_bytes
            data, self._leftover = bytes(self._leftover[:size]), self._leftover[size:]
            return data
        finally:
            self._receiving = False

    def _start_reader(self) -> None:
        if self._reader is None:
            token = trio.lowlevel.current_trio_token()
            self._reader = threading.Thread(
                target=self._read_ahead, args=(token,), name="channel reader", daemon=True
            )
            self._reader.start()

    def _read_ahead(self, token: trio.lowlevel.TrioToken) -> None:
        """The reader thread: the fd into the queue until end of file, an error, or the
        stream's close; then it closes the fd (nobody else does once this runs)."""
        try:
            while not self._closed:
                try:
                    data = os.read(self._read_fd, self._chunk)
                except OSError as e:
                    trio.from_thread.run(self._to_queue.send, e, trio_token=token)
                    return
                if not data:
                    trio.from_thread.run_sync(self._to_queue.close, trio_token=token)
                    return
                trio.from_thread.run(self._to_queue.send, data, trio_token=token)
        except (trio.RunFinishedError, trio.Cancelled, trio.BrokenResourceError):
            pass  # the run or the stream ended while a chunk waited: nobody wants it
        finally:
            _close_quietly(self._read_fd)

    # --- sending ----------------------------------------------------------------------

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self._start_sending()
        try:
            if self._eof_sent:
                raise trio.ClosedResourceError("send_eof was called on this stream")
            # The thread may outlive a cancelled call: it gets bytes nobody can change.
            payload = data if isinstance(data, bytes) else bytes(data)
            with trio.CancelScope() as scope:
                self._send_scope = scope
                await trio.to_thread.run_sync(self._write, payload, abandon_on_cancel=True)
            if scope.cancelled_caught:  # only aclose cancels this scope
                raise trio.ClosedResourceError("the stream was closed")
        except OSError as e:
            raise trio.BrokenResourceError(str(e)) from e
        finally:
            self._send_scope = None
            self._sending = False

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def send_eof(self) -> None:
        """Close the write side once every byte handed over so far (a write a cancelled
        ``send_all`` left running included) is written."""
        self._start_sending()
        try:
            if not self._eof_sent:
                self._eof_sent = True
                await trio.to_thread.run_sync(self._flush_and_shut, abandon_on_cancel=True)
            else:
                await trio.lowlevel.checkpoint()
        finally:
            self._sending = False

    def _start_sending(self) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this stream")
        if self._closed:
            raise trio.ClosedResourceError("the stream was closed")
        self._sending = True

    def _write(self, data: bytes) -> None:
        """In a worker thread: all of ``data``, unless the stream closes meanwhile."""
        with self._write_lock:
            with self._state:
                fd = self._write_fd
                if fd is None or self._write_closing:
                    raise OSError(errno.EPIPE, "the channel's write side is closed")
                self._writing = True
            try:
                view = memoryview(data)
                while view and not self._write_closing:
                    view = view[os.write(fd, view[:WRITE_STEP]) :]
            finally:
                with self._state:
                    self._writing = False
                    shut = self._write_closing  # while we wrote: the close is ours
                    if shut:
                        self._write_fd = None
                if shut:
                    _close_quietly(fd)

    def _flush_and_shut(self) -> None:
        with self._write_lock:
            self._shut_writes()

    def _shut_writes(self) -> None:
        """No more writes; the fd is closed now if idle, else by the write that holds it."""
        with self._state:
            self._write_closing = True
            fd, idle = self._write_fd, not self._writing
            if idle:
                self._write_fd = None
        if fd is not None and idle:
            _close_quietly(fd)

    # --- closing ----------------------------------------------------------------------

    async def aclose(self) -> None:
        """Close both ways at once; a receive or send in flight raises ClosedResourceError."""
        if not self._closed:
            self._closed = True
            if self._send_scope is not None:
                self._send_scope.cancel()
            self._queue.close()
            self._shut_writes()
            if self._reader is None:
                _close_quietly(self._read_fd)
        await trio.lowlevel.checkpoint()


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
