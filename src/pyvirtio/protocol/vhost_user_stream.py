"""vhost-user stream framing: bytes and SCM_RIGHTS fds in, whole messages out.

Theory of operation
-------------------
A vhost-user connection is a Unix stream socket: messages (a 12-byte header,
then ``size`` bytes of payload; vhost-user.rst, "Header") follow each other
with no boundaries, and file descriptors travel as SCM_RIGHTS ancillary data
with the first byte of the message they belong to. One recvmsg may return
part of a message, several messages, or the end of one and the start of the
next. :class:`MessageReader` is fed each chunk with the fds that came with it
and cuts the stream into
:class:`~pyvirtio.protocol.vhost_user_messages.Message` records; its
docstring says how fds are matched to their message. It checks only what
framing needs (version bits, a payload size bound, the number of fds per
message, at most :data:`~pyvirtio.protocol.vhost_user_messages.MAX_FDS`);
the payload is the decoder's (:mod:`pyvirtio.protocol.vhost_user_decode`).
A reader is built per direction with the error class of the peer at fault:
:class:`~pyvirtio.errors.DeviceProtocolError` on the front end,
:class:`~pyvirtio.errors.DriverProtocolError` in a back end.

This module does no socket I/O: the transport (``transport/vhost_user.py``)
or the back end (``backends/``) calls recvmsg and sendmsg;
:func:`fds_from_ancillary` and :func:`scm_rights` convert between fds and the
ancillary data those calls return and take. The one system call here is
close(2), for the fds a reader still holds when the connection is dropped
(:meth:`MessageReader.close_pending_fds`).
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterable, Mapping, Sequence

from pyvirtio.errors import DeviceProtocolError, PyvirtioError
from pyvirtio.protocol.vhost_user_messages import (
    HEADER,
    HEADER_SIZE,
    MAX_FDS,
    MAX_PAYLOAD,
    REQUEST_NAMES,
    VERSION,
    VERSION_MASK,
    Message,
)

# -- stream framing ----------------------------------------------------------------


class MessageReader:
    """Cut a byte stream (plus SCM_RIGHTS fds) into :class:`Message` records.

    ``feed(data, fds)`` once per recvmsg; then ``next_message()`` until it
    returns ``None``. Each fd group is attached to the message that contains
    the *last* byte of the chunk it arrived with: Linux hands out SCM_RIGHTS
    fds with a read that includes the first byte of the sendmsg that carried
    them and ends that read inside the same sendmsg, but the read may begin
    with leftover bytes of the previous message (seen with small reads on a
    socketpair). With one message per sendmsg, the last byte of the chunk is
    therefore always in the message the fds were sent with. The header is
    checked as soon as it is complete: version bits must be 1 and
    size at most ``max_payload``; a message may carry at most
    :data:`MAX_FDS` fds. A violation raises ``error`` (the class given at
    construction: :class:`DeviceProtocolError` on the front end,
    :class:`DriverProtocolError` in a back end) from ``next_message``, after
    the messages complete before it have been returned; the reader then
    stays broken. Fds it still holds (:meth:`pending_fds`) are the reader's
    until returned in a message; :meth:`close_pending_fds` closes them when
    the connection is dropped. ``names`` only labels error messages (pass
    :data:`BACKEND_REQUEST_NAMES` for the back-end channel).
    """

    def __init__(
        self,
        error: type[PyvirtioError] = DeviceProtocolError,
        *,
        max_payload: int = MAX_PAYLOAD,
        names: Mapping[int, str] = REQUEST_NAMES,
    ) -> None:
        self._error = error
        self._names = names
        self._max_payload = max_payload
        self._buf = bytearray()
        self._start = 0  # stream offset of _buf[0]
        self._end = 0  # stream offset just past the last byte fed
        self._fd_groups: deque[tuple[int, tuple[int, ...]]] = deque()
        self._ready: deque[Message] = deque()
        self._failure: str | None = None

    def feed(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Add bytes received from the peer, with the fds received alongside them."""
        if fds:
            # Stream offset of the chunk's last byte (of the next byte if the
            # chunk is empty): the fds belong to the message containing it.
            owner = self._end + len(data) - 1 if data else self._end
            self._fd_groups.append((owner, tuple(fds)))
        if self._failure is not None:
            return  # keep the fds so close_pending_fds() can close them
        self._buf += data
        self._end += len(data)
        self._parse()

    def next_message(self) -> Message | None:
        """The next complete message, or ``None`` if more bytes are needed."""
        if self._ready:
            return self._ready.popleft()
        if self._failure is not None:
            raise self._error(self._failure)
        return None

    def __iter__(self) -> MessageReader:
        return self

    def __next__(self) -> Message:
        msg = self.next_message()
        if msg is None:
            raise StopIteration
        return msg

    @property
    def buffered(self) -> int:
        """Bytes of a message not yet complete (non-zero at EOF means a truncated message)."""
        return len(self._buf)

    @property
    def broken(self) -> bool:
        return self._failure is not None

    def pending_fds(self) -> tuple[int, ...]:
        """Fds received but not yet handed out in a returned message."""
        held = [fd for msg in self._ready for fd in msg.fds]
        held.extend(fd for _, group in self._fd_groups for fd in group)
        return tuple(held)

    def close_pending_fds(self) -> None:
        """Close every fd the reader holds and drop all buffered input.

        For connection teardown: messages not yet returned are discarded with
        their fds, so nothing received leaks.
        """
        fds = self.pending_fds()
        self._ready.clear()
        self._fd_groups.clear()
        self._buf.clear()
        self._start = self._end
        _close_fds(fds)

    def _fail(self, reason: str) -> None:
        self._failure = reason

    def _parse(self) -> None:
        while self._failure is None and len(self._buf) >= HEADER_SIZE:
            request, flags, size = HEADER.unpack_from(self._buf, 0)
            name = self._names.get(request, f"request {request}")
            if flags & VERSION_MASK != VERSION:
                self._fail(
                    f"{name}: header version {flags & VERSION_MASK} (flags 0x{flags:x}), expected {VERSION}"
                )
                return
            if size > self._max_payload:
                self._fail(f"{name}: payload size {size} exceeds the limit of {self._max_payload} bytes")
                return
            total = HEADER_SIZE + size
            if len(self._buf) < total:
                break
            end = self._start + total
            fds: list[int] = []
            while self._fd_groups and self._fd_groups[0][0] < end:
                fds.extend(self._fd_groups[0][1])
                self._fd_groups.popleft()
            if len(fds) > MAX_FDS:
                # Put them back so close_pending_fds() finds them.
                self._fd_groups.appendleft((self._start, tuple(fds)))
                self._fail(f"{name}: {len(fds)} file descriptors, at most {MAX_FDS} allowed")
                return
            payload = bytes(self._buf[HEADER_SIZE:total])
            del self._buf[:total]
            self._start = end
            self._ready.append(Message(request, flags, payload, tuple(fds)))
        held = sum(len(group) for _, group in self._fd_groups)
        if self._failure is None and held > MAX_FDS:
            self._fail(
                f"{held} file descriptors received for an incomplete message, at most {MAX_FDS} allowed"
            )


def _close_fds(fds: Iterable[int]) -> None:
    """The one place this module closes fds: on connection teardown."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


# -- SCM_RIGHTS ancillary data (pure data: the transport and the server do the sendmsg/recvmsg) ----


def fds_from_ancillary(ancillary: Iterable[tuple[int, int, bytes]]) -> list[int]:
    """The file descriptors in recvmsg() ancillary data (SCM_RIGHTS records only)."""
    import array
    import socket

    fds: list[int] = []
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(data[: len(data) - len(data) % arr.itemsize])
            fds.extend(arr)
    return fds


def scm_rights(fds: Sequence[int]) -> list[tuple[int, int, bytes]]:
    """sendmsg() ancillary data passing ``fds`` (empty when there are none)."""
    import array
    import socket

    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
