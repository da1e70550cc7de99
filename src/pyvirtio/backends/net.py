"""The virtio-net device model of the embedded back end (virtio 1.2 §5.1).

:class:`NetBackend` is the data path of a vhost-user-net device, served by
:class:`~pyvirtio.backends.server.VhostUserServer` (``pyvirtio serve net``).
Like every vhost-user net back end (DPDK's vhost PMD, QEMU's peers) it runs
only the receive and transmit queues; the control queue belongs to the
frontend (:mod:`pyvirtio.transport.vhost_user_net`), and GET_QUEUE_NUM
answers queue *pairs* (``vhost_queue_num``).

Modes:

``loopback``
    every frame the driver transmits on pair p is received on pair p,
    optionally with source and destination MAC swapped (``swap_mac``, what
    testpmd's macswap does).
``tap``
    pair 0 is bridged to a Linux TAP device (``/dev/net/tun``, IFF_TAP |
    IFF_NO_PI): transmitted frames are written to it, frames the kernel
    sends are received. A reader thread feeds the receive side.

Receive is device-initiated: the receive rings are *gated* (the server
takes their chains only while :meth:`NetBackend.pending` says frames are
waiting) and ``wake_fd`` tells the server when frames arrive. A frame is
written as header + data into one chain; with MRG_RXBUF negotiated a frame
larger than one chain spreads over several, and ``num_buffers`` in the first
header says how many (virtio 1.2 §5.1.6.4; the count is computed from the
first chain's size: the driver posts equal buffers). Without MRG_RXBUF a
frame that does not fit is dropped (and counted).

Checksums: a transmitted header with NEEDS_CSUM is passed on as is when the
driver negotiated GUEST_CSUM; otherwise (and always towards the TAP device)
the checksum is computed here. Nothing from the driver is trusted: a
header shorter than 12 bytes, a checksum offset outside the frame, or a
frame shorter than an Ethernet header is dropped and counted.
"""

from __future__ import annotations

import collections
import fcntl
import logging
import os
import select
import struct
import threading
from typing import Any

from pyvirtio.backends.model import RING_FEATURES
from pyvirtio.ring.device_side import Chain
from pyvirtio.spec import net as N

log = logging.getLogger("pyvirtio.backends.net")

HDR_SIZE = N.HDR_SIZE
MODES = ("loopback", "tap")
#: Frames waiting for receive buffers, per pair, before new ones are dropped.
MAX_PENDING = 4096

_ZERO_HDR = bytes(HDR_SIZE)
_TUNSETIFF = 0x400454CA
_IFF_TAP = 0x0002
_IFF_NO_PI = 0x1000


def _csum_fold(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


class NetBackend:
    """A virtio-net device: loopback or TAP (see the module docstring)."""

    def __init__(
        self,
        mode: str = "loopback",
        *,
        pairs: int = 1,
        mac: bytes = b"\x02\x70\x79\x76\x00\x01",
        mtu: int = 1500,
        swap_mac: bool = False,
        tap: str | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
        if not 1 <= pairs <= 128:
            raise ValueError(f"pairs must be 1..128, got {pairs}")
        if mode == "tap" and pairs != 1:
            raise ValueError("tap mode serves one queue pair")
        if len(mac) != 6:
            raise ValueError("a MAC address has 6 bytes")
        if not 68 <= mtu <= 65535:
            raise ValueError(f"mtu must be 68..65535, got {mtu}")
        self.mode = mode
        self.pairs = pairs
        self.mac = bytes(mac)
        self.mtu = mtu
        self.swap_mac = swap_mac
        self.num_queues = 2 * pairs
        self.vhost_queue_num = pairs
        #: Receive queues: chains are taken only while frames wait (device-initiated).
        self.gated_queues = tuple(range(0, 2 * pairs, 2))
        self.wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        # Frames waiting for the driver's receive buffers, each with its 12-byte header in front.
        self._pending: list[collections.deque[bytes]] = [collections.deque() for _ in range(pairs)]
        # The frame being written into the current receive chain(s): [data, offset, buffers left].
        self._current: list[list[Any] | None] = [None] * pairs
        self.acked = 0
        self.mrg_rxbuf = False
        self.guest_csum = False
        self.counters = {"tx_frames": 0, "tx_bytes": 0, "rx_frames": 0, "rx_bytes": 0, "dropped": 0, "bad": 0}
        self.tap_name: str | None = None
        self.tap_fd = -1
        self._stop_r = self._stop_w = -1
        self._thread: threading.Thread | None = None
        if mode == "tap":
            self._open_tap(tap or "pyvirtio%d")

    # -- DeviceModel -------------------------------------------------------------

    def features(self) -> int:
        f = (
            RING_FEATURES
            | (1 << N.F_MAC)
            | (1 << N.F_STATUS)
            | (1 << N.F_MTU)
            | (1 << N.F_MRG_RXBUF)
            | (1 << N.F_CSUM)
            | (1 << N.F_GUEST_CSUM)
        )
        if self.pairs > 1:
            f |= 1 << N.F_MQ
        return f

    def config(self) -> bytes:
        return self.mac + struct.pack("<HHH", N.S_LINK_UP, self.pairs, self.mtu) + bytes(N.CONFIG_SIZE - 12)

    def negotiated(self, features: int) -> None:
        """SET_FEATURES: a new driver; frames queued for the previous one are dropped."""
        self.acked = features
        self.mrg_rxbuf = bool(features >> N.F_MRG_RXBUF & 1)
        self.guest_csum = bool(features >> N.F_GUEST_CSUM & 1)
        self.reset()

    def reset(self) -> None:
        for q in self._pending:
            q.clear()
        self._current = [None] * self.pairs

    def pending(self, queue: int) -> int:
        """Receive chains wanted now on ``queue`` (a lower bound: a frame may need more than one)."""
        pair = queue // 2
        cur = self._current[pair]
        return len(self._pending[pair]) + (cur[2] if cur is not None else 0)

    def handle(self, queue: int, chain: Chain) -> int:
        pair = queue // 2
        if queue % 2:
            self._transmit(pair, chain)
            return 0
        return self._receive(pair, chain)

    def info(self) -> dict[str, Any]:
        return {
            "type": "net",
            "mode": self.mode,
            "pairs": self.pairs,
            "mac": self.mac.hex(":"),
            "mtu": self.mtu,
            "swap_mac": self.swap_mac,
            "tap": self.tap_name,
            "counters": dict(self.counters),
        }

    # -- transmit (driver -> device) ----------------------------------------------

    def _transmit(self, pair: int, chain: Chain) -> None:
        data = chain.read_all()
        c = self.counters
        if len(data) < HDR_SIZE + 14:
            c["bad"] += 1
            return
        flags, _gso, _hl, _gs, start, offset, _nb = N.HDR.unpack_from(data)
        frame = data[HDR_SIZE:]
        c["tx_frames"] += 1
        c["tx_bytes"] += len(frame)
        hdr = b""
        if flags & N.HDR_F_NEEDS_CSUM:
            if start + offset + 2 > len(frame):
                c["bad"] += 1
                return
            if self.guest_csum and self.mode == "loopback":
                hdr = N.HDR.pack(N.HDR_F_NEEDS_CSUM, 0, 0, 0, start, offset, 0)
            else:
                frame = _complete_csum(frame, start, offset)
        if self.swap_mac:
            frame = frame[6:12] + frame[0:6] + frame[12:]
        if self.mode == "tap":
            try:
                os.write(self.tap_fd, frame)
            except OSError as exc:
                c["dropped"] += 1
                log.debug("tap write failed: %s", exc)
            return
        self._queue_rx(pair, hdr, frame)

    def _queue_rx(self, pair: int, hdr: bytes, frame: bytes) -> None:
        q = self._pending[pair]
        if len(q) >= MAX_PENDING:
            self.counters["dropped"] += 1
            return
        was_idle = not q and self._current[pair] is None
        q.append((hdr or _ZERO_HDR) + frame)
        if was_idle:
            os.eventfd_write(self.wake_fd, 1)

    # -- receive (device -> driver) -------------------------------------------------

    def _receive(self, pair: int, chain: Chain) -> int:
        cap = chain.writable_len
        cur = self._current[pair]
        c = self.counters
        if cur is None:
            q = self._pending[pair]
            while True:
                if not q:
                    return 0  # nothing waits (the server only asks when pending() > 0)
                data = q.popleft()
                total = len(data)
                if total <= cap:
                    nb = 1
                elif self.mrg_rxbuf and cap > 0:
                    nb = -(-total // cap)
                else:
                    c["dropped"] += 1  # too large for one buffer without MRG_RXBUF
                    continue
                data = data[:10] + struct.pack("<H", nb) + data[HDR_SIZE:]
                cur = [data, 0, nb]
                self._current[pair] = cur
                c["rx_frames"] += 1
                c["rx_bytes"] += total - HDR_SIZE
                break
        data, off, left = cur
        if left == 1:
            piece = data[off:]
            written = chain.write(piece)
            if written < len(piece):
                c["bad"] += 1  # a later buffer was smaller than the first: truncated
        else:
            written = chain.write(data[off : off + cap])
        cur[1] = off + written
        cur[2] = left - 1
        if cur[2] == 0:
            self._current[pair] = None
        return written

    # -- TAP ---------------------------------------------------------------------

    def _open_tap(self, name: str) -> None:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
        try:
            ifr = struct.pack("16sH", name.encode(), _IFF_TAP | _IFF_NO_PI)
            res = fcntl.ioctl(fd, _TUNSETIFF, ifr)
        except BaseException:
            os.close(fd)
            raise
        self.tap_fd = fd
        self.tap_name = res[:16].rstrip(b"\0").decode()
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
        self._thread = threading.Thread(target=self._tap_reader, name=f"tap {self.tap_name}", daemon=True)
        self._thread.start()
        log.info("TAP device %s opened", self.tap_name)

    def _tap_reader(self) -> None:
        fd = self.tap_fd
        while True:
            ready, _, _ = select.select([fd, self._stop_r], [], [])
            if self._stop_r in ready:
                return
            try:
                frame = os.read(fd, 65536)
            except OSError:
                continue
            if len(frame) < 14:
                continue
            q = self._pending[0]
            if len(q) >= MAX_PENDING:
                self.counters["dropped"] += 1
                continue
            q.append(_ZERO_HDR + frame)
            os.eventfd_write(self.wake_fd, 1)

    def close(self) -> None:
        if self._thread is not None:
            os.write(self._stop_w, b"x")
            self._thread.join(5)
            self._thread = None
        for name in ("_stop_r", "_stop_w", "tap_fd", "wake_fd"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)


def _complete_csum(frame: bytes, start: int, offset: int) -> bytes:
    """Finish a partial checksum: the 16-bit sum from ``start`` (seeded by the pseudo-header sum already
    in the checksum field, as NEEDS_CSUM specifies) stored at ``start + offset`` (virtio 1.2 §5.1.6.2)."""
    csum = _csum_fold(frame[start:])
    pos = start + offset
    return frame[:pos] + struct.pack("!H", csum) + frame[pos + 2 :]


__all__ = ["MODES", "NetBackend"]
