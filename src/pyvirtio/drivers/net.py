"""VirtioNet: the virtio-net driver (virtio 1.2 §5.1; DPDK's virtio PMD, Linux virtio_net).

Theory of operation. :class:`VirtioNet` negotiates the net features it
understands, reads MAC / status / MTU / max_virtqueue_pairs from the config
space when their feature bits are offered, starts the queues (rx0, tx0,
rx1, tx1, ..., then the control queue, virtio 1.2 §5.1.2), sends
``MQ VQ_PAIRS_SET`` when it uses more than one pair, and then moves frames.
Every frame on a ring carries the 12-byte ``virtio_net_hdr_v1`` in front of
it (VERSION_1 is always negotiated, so the header has ``num_buffers`` with
and without MRG_RXBUF).

Rings. Both rings of a pair have one single-buffer chain per *slot*, posted
through the ring's batch fast path, and every used entry is validated
(:mod:`pyvirtio.drivers.net_queues`: :class:`~pyvirtio.drivers.net_queues.RxQueue`,
:class:`~pyvirtio.drivers.net_queues.TxQueue`). The frame format, the
transmit-header checks and the MAC helpers are in
:mod:`pyvirtio.drivers.net_frames` (re-exported here).

Receive buffers are kept posted: all slots are posted at start and a slot
goes back to the device as soon as the caller is done with it.

**Zero copy, and when a frame is recycled.** :meth:`VirtioNet.recv_batch`
returns each frame as a memoryview straight into its receive buffer (the
header is skipped). Those views stay valid until the *next receive call on
the same queue pair* (``recv_batch``, ``recv``, ``arecv``) or
:meth:`VirtioNet.release_rx`: that call releases them (any later use raises
``ValueError: operation forbidden on released memoryview object``) and
re-posts their buffers to the device. Keep a frame longer with
``bytes(frame)``. One exception: a frame that the device spread over
several buffers (MRG_RXBUF, frame larger than ``rx_buf_size``) is gathered
into one new ``bytes`` object (a copy); its buffers are re-posted at once.
At most ``max_n`` buffers are out of the device's hands at any time.

Transmit copies each frame once, into its slot, behind the header
(:meth:`VirtioNet.send_batch`: one kick for the whole batch). Completed
slots are reclaimed at the next send (or :meth:`VirtioNet.reclaim_tx`).

Checksum offload: with ``csum=True`` the driver negotiates
VIRTIO_NET_F_CSUM / GUEST_CSUM when offered; a :class:`NetHdr` passed to
``send_batch`` goes out as the frame's header (NEEDS_CSUM with csum_start /
csum_offset), and ``recv_batch(with_headers=True)`` hands the received
header to the caller (NEEDS_CSUM or DATA_VALID flags). GSO is not
negotiated.

The control queue (CTRL_VQ): promiscuous / all-multicast (CTRL_RX), MAC
address (CTRL_MAC_ADDR), MAC filter tables, MQ pairs. Commands are
serialised by a lock and may come from any thread; an ack other than
VIRTIO_NET_OK raises :class:`NetControlError`.

Threads: queue pair i is used by one thread at a time. The first data call
on a pair from a thread acquires its two queues (``VirtioDevice.acquire``);
another thread gets :class:`~pyvirtio.errors.OwnershipError` until
:meth:`VirtioNet.release_pair`. No locks on the data path.

Three APIs: batch (:meth:`~VirtioNet.send_batch` / :meth:`~VirtioNet.recv_batch`),
simple (:meth:`~VirtioNet.send` / :meth:`~VirtioNet.recv`), and asyncio
(:meth:`~VirtioNet.asend` / :meth:`~VirtioNet.arecv`, woken by the queues'
interrupt eventfds through ``loop.add_reader``).
"""

from __future__ import annotations

import asyncio
import struct
import threading
import time
from collections.abc import Sequence
from typing import Any

from pyvirtio.device import VirtioDevice
from pyvirtio.drivers.net_frames import (
    ETH_HLEN,
    ETH_VLAN_HLEN,
    HDR_SIZE,
    ZERO_HDR,
    NetHdr,
    build_frame,
    check_tx_header,
    format_mac,
    inet_checksum,
    parse_mac,
    random_mac,
)
from pyvirtio.drivers.net_queues import QueuePair, RxQueue, TxQueue
from pyvirtio.errors import (
    DeviceProtocolError,
    InvalidArgument,
    NetControlError,
    OwnershipError,
    TransportError,
    TransportTimeout,
)
from pyvirtio.memory import Buffer
from pyvirtio.spec import net as N
from pyvirtio.spec.common import DEVICE_ID_NET, F_RING_EVENT_IDX

DEFAULT_MTU = 1500
DEFAULT_RX_BUF = 2048

#: Features the driver asks for (offloads only with ``csum=True``).
#: Features that virtio 1.2 §5.1.3.1 makes depend on VIRTIO_NET_F_CTRL_VQ.
_NEEDS_CTRL_VQ = (
    (1 << N.F_CTRL_RX)
    | (1 << N.F_CTRL_VLAN)
    | (1 << N.F_GUEST_ANNOUNCE)
    | (1 << N.F_MQ)
    | (1 << N.F_CTRL_MAC_ADDR)
    | (1 << N.F_CTRL_RX_EXTRA)
    | (1 << N.F_CTRL_GUEST_OFFLOADS)
)

DRIVER_FEATURES = (
    (1 << N.F_MAC)
    | (1 << N.F_STATUS)
    | (1 << N.F_MTU)
    | (1 << N.F_MRG_RXBUF)
    | (1 << N.F_CTRL_VQ)
    | (1 << N.F_CTRL_RX)
    | (1 << N.F_CTRL_MAC_ADDR)
    | (1 << N.F_MQ)
    | (1 << F_RING_EVENT_IDX)
)
CSUM_FEATURES = (1 << N.F_CSUM) | (1 << N.F_GUEST_CSUM)

_CTRL_BUF = 4096
_CTRL_ACK_OFF = _CTRL_BUF - 1


class VirtioNet:
    """A virtio-net device (see the module docstring).

    ``queue_pairs``: pairs to use (default: all the device has; >1 needs MQ).
    ``mac``: the address to use when the device has none (no F_MAC), or to
    set with MAC_ADDR_SET; default: the device's, else a random local one.
    ``mrg_rxbuf``: negotiate mergeable receive buffers. ``rx_buf_size``:
    bytes per receive buffer (header included; without MRG_RXBUF it must
    hold the largest frame + 12). ``csum``: negotiate checksum offload.
    ``ring`` (``"split"``, ``"packed"``, ``"auto"``) and ``in_order`` (True,
    False, ``"auto"``): the ring format and VIRTIO_F_IN_ORDER
    (:meth:`VirtioDevice.reset <pyvirtio.device.VirtioDevice.reset>`).
    """

    def __init__(
        self,
        device: VirtioDevice,
        *,
        queue_pairs: int | None = None,
        queue_size: int | None = None,
        mac: str | bytes | None = None,
        mrg_rxbuf: bool = True,
        rx_buf_size: int = DEFAULT_RX_BUF,
        csum: bool = False,
        event_idx: bool = True,
        timeout: float | None = 10.0,
        ring: str = "auto",
        in_order: bool | str = "auto",
    ) -> None:
        dtype = device.transport.device_type()
        if dtype != DEVICE_ID_NET:
            raise InvalidArgument(f"{device.name}: not a virtio-net device (device type {dtype})")
        if rx_buf_size < HDR_SIZE + ETH_HLEN or rx_buf_size % 2:
            raise InvalidArgument(f"rx_buf_size {rx_buf_size} must be even and hold a header and an Ethernet header")
        self.device = device
        self.pool = device.pool
        self.timeout = timeout
        wanted = DRIVER_FEATURES
        if not mrg_rxbuf:
            wanted &= ~(1 << N.F_MRG_RXBUF)
        if csum:
            wanted |= CSUM_FEATURES
        if not event_idx:
            wanted &= ~(1 << F_RING_EVENT_IDX)
        self.features = device.reset(wanted, ring=ring, in_order=in_order)
        if not device.has_feature(N.F_CTRL_VQ) and self.features & _NEEDS_CTRL_VQ:
            # virtio 1.2 §5.1.3.1: these require VIRTIO_NET_F_CTRL_VQ; a device that
            # offers them without it gets them declined (reset and negotiate again).
            self.features = device.reset(wanted & ~_NEEDS_CTRL_VQ, ring=ring, in_order=in_order)
        has = device.has_feature
        self.mrg_rxbuf = has(N.F_MRG_RXBUF)
        self.has_ctrl = has(N.F_CTRL_VQ)
        self.csum = has(N.F_CSUM)
        self.guest_csum = has(N.F_GUEST_CSUM)
        cfg = self._read_config()
        self.config = cfg
        self.max_pairs = (_cfg_int(cfg, "max_virtqueue_pairs") or 1) if has(N.F_MQ) else 1
        if has(N.F_MQ) and not N.CTRL_MQ_VQ_PAIRS_MIN <= self.max_pairs <= N.CTRL_MQ_VQ_PAIRS_MAX:
            device.fail()
            raise DeviceProtocolError(f"device reports max_virtqueue_pairs {self.max_pairs}")
        # The config may claim more pairs than the device has queues: trust the queues.
        fit = (device.transport.max_queues() - (1 if self.has_ctrl else 0)) // 2
        if fit < 1:
            device.fail()
            raise DeviceProtocolError(f"device has {device.transport.max_queues()} queues: not one rx/tx pair")
        self.max_pairs = min(self.max_pairs, fit)
        pairs = self.max_pairs if queue_pairs is None else queue_pairs
        if not 1 <= pairs <= self.max_pairs:
            device.fail()
            raise InvalidArgument(f"queue_pairs must be 1..{self.max_pairs} for this device, got {pairs}")
        if pairs > 1 and not (has(N.F_MQ) and self.has_ctrl):
            device.fail()
            raise InvalidArgument("more than one queue pair needs VIRTIO_NET_F_MQ and a control queue")
        self.num_pairs = pairs
        self.active_pairs = 1
        self.mtu: int | None = (_cfg_int(cfg, "mtu") or None) if has(N.F_MTU) else None
        self.device_mac: bytes | None = parse_mac(str(cfg["mac"])) if has(N.F_MAC) and "mac" in cfg else None
        self.link_status: int | None = _cfg_int(cfg, "status") if has(N.F_STATUS) else None
        self.max_frame = (self.mtu or DEFAULT_MTU) + ETH_VLAN_HLEN
        if not self.mrg_rxbuf and rx_buf_size < HDR_SIZE + self.max_frame:
            device.fail()
            raise InvalidArgument(
                f"rx_buf_size {rx_buf_size} cannot hold a {self.max_frame}-byte frame without MRG_RXBUF"
            )
        self.rx_buf_size = rx_buf_size
        nq = 2 * self.max_pairs + (1 if self.has_ctrl else 0)
        device.start(nq, 0, queue_size=queue_size)
        self.queue_size = device.queue(0).size
        self._ctrl_lock = threading.Lock()
        self._ctrl_buf: Buffer | None = None
        self._pairs: list[QueuePair] = []
        self._pair_lock = threading.Lock()
        try:
            if self.has_ctrl:
                self._ctrl_buf = self.pool.allocate(_CTRL_BUF, align=64)
            slot = -(-(HDR_SIZE + self.max_frame) // 64) * 64
            for i in range(pairs):
                rx = RxQueue(device, 2 * i, rx_buf_size)
                tx = TxQueue(device, 2 * i + 1, slot)
                self._pairs.append(QueuePair(i, rx, tx))
                if rx.fixed.post(list(range(rx.nslots))):
                    device.transport.notify_queue(rx.index)
            if pairs > 1:
                self.set_queue_pairs(pairs)
            self.mac = self.device_mac or random_mac()
            if mac is not None:
                want = parse_mac(mac)
                if want != self.mac and self.device_mac is not None and has(N.F_CTRL_MAC_ADDR):
                    self.set_mac(want)
                self.mac = want
        except BaseException:
            self._close_pairs()
            raise

    # -- construction helpers -------------------------------------------------

    @classmethod
    def open(cls, target: str, **kw: Any) -> VirtioNet:
        """Open ``vhost-user:PATH`` (or a socket path), or ``pci:ADDR``, as a virtio-net device.

        The control queue and (without PROTOCOL_F_CONFIG) the config space
        are provided by the frontend
        (:class:`~pyvirtio.transport.vhost_user_net.VhostUserNetTransport`).
        Transport options: ``connect_timeout``, ``timeout`` (also the
        driver's), ``queue_size``; ``queue_pairs`` sizes the device;
        ``packed_zero_wrap`` goes to the device (:class:`VirtioDevice`).
        """
        from pyvirtio.targets import open_driver, parse_target
        from pyvirtio.transport.vhost_user import VhostUserTransport
        from pyvirtio.transport.vhost_user_net import VhostUserNetTransport

        kind, path = parse_target(target)
        if kind == "pci":  # the device has its own config and control queue
            return open_driver(cls, target, DEVICE_ID_NET, kw)
        tkw: dict[str, Any] = {}
        if kw.get("queue_size"):
            tkw["queue_size"] = kw["queue_size"]
        if "connect_timeout" in kw:
            tkw["connect_timeout"] = kw.pop("connect_timeout")
        if kw.get("timeout") is not None:
            tkw["timeout"] = kw["timeout"]
        inner = VhostUserTransport(path, device_type=DEVICE_ID_NET, **tkw)
        try:
            transport = VhostUserNetTransport(inner, pairs=int(kw.get("queue_pairs") or 1))
        except BaseException:
            inner.close()
            raise
        device = VirtioDevice(target, transport, packed_zero_wrap=bool(kw.pop("packed_zero_wrap", False)))
        try:
            return cls(device, **kw)
        except BaseException:
            device.close()
            raise

    def _read_config(self) -> dict[str, object]:
        """Read exactly the config bytes the negotiated features make valid (none if none)."""
        has = self.device.has_feature
        length = 0
        if has(N.F_MAC):
            length = 6
        if has(N.F_STATUS):
            length = 8
        if has(N.F_MQ):
            length = 10
        if has(N.F_MTU):
            length = 12
        if not length:
            return {}
        try:
            data = self.device.read_config(0, length)
        except TransportError as exc:
            self.device.fail()
            raise DeviceProtocolError(f"{self.device.name}: cannot read the net config: {exc}") from None
        return N.parse_config(data)

    def close(self) -> None:
        self._close_pairs()
        self.device.close()

    def _close_pairs(self) -> None:
        for p in self._pairs:
            p.rx.close(self.pool)
            p.tx.close(self.pool)
        self._pairs = []
        if self._ctrl_buf is not None:
            self.pool.free(self._ctrl_buf)
            self._ctrl_buf = None

    def __enter__(self) -> VirtioNet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def link_up(self) -> bool | None:
        """True/False from the config status (F_STATUS), re-read now; None if the device does not say."""
        if self.link_status is None:
            return None
        status = _cfg_int(N.parse_config(self.device.read_config(0, 8)), "status")
        self.link_status = status
        return bool(status & N.S_LINK_UP)

    def info(self) -> dict[str, Any]:
        out = self.device.info()
        out["net"] = {
            "mac": format_mac(self.mac),
            "device_mac": None if self.device_mac is None else format_mac(self.device_mac),
            "mtu": self.mtu,
            "link_status": self.link_status,
            "max_queue_pairs": self.max_pairs,
            "queue_pairs": self.num_pairs,
            "queue_size": self.queue_size,
            "mrg_rxbuf": self.mrg_rxbuf,
            "control_queue": self.has_ctrl,
            "csum": self.csum,
            "guest_csum": self.guest_csum,
            "rx_buf_size": self.rx_buf_size,
            "max_frame": self.max_frame,
        }
        return out

    def stats(self) -> dict[str, int]:
        out = {"rx_frames": 0, "rx_bytes": 0, "rx_errors": 0, "rx_merged": 0, "tx_frames": 0, "tx_bytes": 0}
        for p in self._pairs:
            out["rx_frames"] += p.rx.frames
            out["rx_bytes"] += p.rx.bytes
            out["rx_errors"] += p.rx.errors
            out["rx_merged"] += p.rx.merged
            out["tx_frames"] += p.tx.frames
            out["tx_bytes"] += p.tx.bytes
        return out

    # -- queue pairs and threads ----------------------------------------------

    def queue_pair(self, index: int) -> QueuePair:
        """Queue pair ``index`` (its rx and tx queues), acquired for the calling thread on first use."""
        try:
            p = self._pairs[index]
        except (IndexError, TypeError):
            raise InvalidArgument(f"no queue pair {index} (the driver uses {self.num_pairs})") from None
        me = threading.get_ident()
        if p.owner != me:
            with self._pair_lock:
                if p.owner is not None and p.owner != me:
                    raise OwnershipError(f"queue pair {index} is used by thread {p.owner}")
                self.device.acquire(p.rx.index)
                try:
                    self.device.acquire(p.tx.index)
                except BaseException:
                    self.device.release(p.rx.index)
                    raise
                p.owner = me
        return p

    def release_pair(self, index: int) -> None:
        """Let another thread use queue pair ``index`` (frames the caller holds are recycled first)."""
        p = self.queue_pair(index)
        p.rx.recycle()
        with self._pair_lock:
            self.device.release(p.rx.index)
            self.device.release(p.tx.index)
            p.owner = None

    # -- control queue (virtio 1.2 §5.1.6.5) ------------------------------------

    def control(self, cls: int, cmd: int, data: bytes = b"") -> None:
        """Send one control command and wait for its ack; raises NetControlError on VIRTIO_NET_ERR."""
        if not self.has_ctrl or self._ctrl_buf is None:
            raise InvalidArgument("the device has no control queue (VIRTIO_NET_F_CTRL_VQ not negotiated)")
        if len(data) > _CTRL_ACK_OFF - 2:
            raise InvalidArgument(f"control command payload of {len(data)} bytes is too large")
        with self._ctrl_lock:
            vq = self.device.queue(2 * self.max_pairs)
            ring = vq.ring
            buf = self._ctrl_buf
            v = buf.view
            v[0] = cls
            v[1] = cmd
            v[2 : 2 + len(data)] = data
            v[_CTRL_ACK_OFF] = 0xFF
            token = object()
            ring.submit(token, [(buf.addr, 2 + len(data), False), (buf.addr + _CTRL_ACK_OFF, 1, True)])
            if ring.kick_prepare():
                self.device.transport.notify_queue(vq.index)
            deadline = None if self.timeout is None else time.monotonic() + self.timeout
            while True:
                done = ring.reap()
                if done:
                    break
                if deadline is not None and time.monotonic() > deadline:
                    raise TransportTimeout(f"control command {cls}/{cmd} not answered within {self.timeout} s")
                self.device.transport.check_alive()
                self.device.transport.wait_queue(vq.index, 0.01)
            if done[0][0] is not token:
                raise DeviceProtocolError("control queue completed an unknown request")
            ack = v[_CTRL_ACK_OFF]
        if ack != N.CTRL_OK:
            raise NetControlError(f"control command class {cls} cmd {cmd} refused by the device (ack {ack})")

    def _need(self, bit: int, what: str) -> None:
        if not self.device.has_feature(bit):
            raise InvalidArgument(f"{what}: VIRTIO_NET_F_{N.FEATURE_NAMES[bit][4:]} was not negotiated")

    def set_promisc(self, on: bool = True) -> None:
        self._need(N.F_CTRL_RX, "promiscuous mode")
        self.control(N.CTRL_RX, N.CTRL_RX_PROMISC, bytes([1 if on else 0]))

    def set_allmulti(self, on: bool = True) -> None:
        self._need(N.F_CTRL_RX, "all-multicast mode")
        self.control(N.CTRL_RX, N.CTRL_RX_ALLMULTI, bytes([1 if on else 0]))

    def set_mac(self, mac: str | bytes) -> None:
        """Change the device's MAC address (VIRTIO_NET_CTRL_MAC_ADDR_SET)."""
        raw = parse_mac(mac)
        self._need(N.F_CTRL_MAC_ADDR, "MAC address set")
        self.control(N.CTRL_MAC, N.CTRL_MAC_ADDR_SET, raw)
        self.mac = raw

    def set_mac_table(self, unicast: Sequence[str | bytes] = (), multicast: Sequence[str | bytes] = ()) -> None:
        """The receive filter tables (VIRTIO_NET_CTRL_MAC_TABLE_SET)."""
        self._need(N.F_CTRL_RX, "MAC filter table")
        data = b""
        for table in (unicast, multicast):
            data += struct.pack("<I", len(table)) + b"".join(parse_mac(m) for m in table)
        self.control(N.CTRL_MAC, N.CTRL_MAC_TABLE_SET, data)

    def set_queue_pairs(self, n: int) -> None:
        """How many pairs the device may use (VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET)."""
        self._need(N.F_MQ, "queue pairs")
        if not 1 <= n <= self.max_pairs:
            raise InvalidArgument(f"queue pairs must be 1..{self.max_pairs}, got {n}")
        self.control(N.CTRL_MQ, N.CTRL_MQ_VQ_PAIRS_SET, struct.pack("<H", n))
        self.active_pairs = n

    # -- transmit -------------------------------------------------------------

    def reclaim_tx(self, pair: int = 0) -> int:
        """Take back the transmit slots the device has finished with; returns how many."""
        return self.queue_pair(pair).tx.reclaim()

    def tx_free(self, pair: int = 0) -> int:
        """Frames that can be queued on ``pair`` now (after reclaiming)."""
        tx = self.queue_pair(pair).tx
        tx.reclaim()
        return len(tx.free)

    def send_batch(
        self,
        frames: Sequence[bytes | bytearray | memoryview],
        pair: int = 0,
        hdr: NetHdr | Sequence[NetHdr | None] | None = None,
    ) -> int:
        """Queue as many ``frames`` as there are free slots, kick once; returns how many were queued.

        ``hdr``: one :class:`NetHdr` for every frame, or one per frame (None:
        a zero header). Every frame is checked before any is queued.
        """
        p = self.queue_pair(pair)
        tx = p.tx
        max_frame = self.max_frame
        for i, f in enumerate(frames):
            n = len(f)
            if not ETH_HLEN <= n <= max_frame:
                raise InvalidArgument(f"frame {i}: {n} bytes; a frame has {ETH_HLEN}..{max_frame} bytes")
        hdrs: list[bytes | None] | None = None
        if hdr is not None:
            items: list[NetHdr | None] = (
                [hdr] * len(frames) if isinstance(hdr, NetHdr) else list(hdr)
            )
            if len(items) != len(frames):
                raise InvalidArgument(f"{len(items)} headers for {len(frames)} frames")
            csum = self.csum
            hdrs = [None if h is None else check_tx_header(h, len(f), csum) for h, f in zip(items, frames, strict=True)]
        tx.reclaim()
        free = tx.free
        count = min(len(frames), len(free))
        if not count:
            return 0
        view = tx.view
        lengths = tx.lengths
        length_at = tx.length_at
        size = tx.slot_size
        dirty = tx.hdr_dirty
        slots: list[int] = []
        nbytes = 0
        for i in range(count):
            f = frames[i]
            n = len(f)
            s = free.pop()
            base = size * s
            view[base + HDR_SIZE : base + HDR_SIZE + n] = f
            lengths[length_at[s]] = HDR_SIZE + n
            h = hdrs[i] if hdrs is not None else None
            if h is not None:
                view[base : base + HDR_SIZE] = h
                dirty[s] = 1
            elif dirty[s]:
                view[base : base + HDR_SIZE] = ZERO_HDR
                dirty[s] = 0
            slots.append(s)
            nbytes += n
        if tx.fixed.post(slots):
            self.device.transport.notify_queue(tx.index)
        tx.frames += count
        tx.bytes += nbytes
        return count

    def send(self, frame: bytes | bytearray | memoryview, pair: int = 0, hdr: NetHdr | None = None) -> None:
        """Queue one frame, waiting (up to ``timeout``) for a free slot."""
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        spins = 0
        while not self.send_batch([frame], pair, hdr):
            spins += 1
            if deadline is not None and time.monotonic() > deadline:
                raise TransportTimeout(f"no transmit slot freed within {self.timeout} s")
            if spins & 0xFF == 0xFF:  # not on the first spins: a device that answers at once costs no syscall
                self.device.transport.check_alive()
                time.sleep(0.0001)

    def flush_tx(self, pair: int = 0, timeout: float | None = -1.0) -> None:
        """Wait until the device has taken every queued frame of ``pair``."""
        tmo = self.timeout if timeout == -1.0 else timeout
        deadline = None if tmo is None else time.monotonic() + tmo
        p = self.queue_pair(pair)
        while len(p.tx.free) < p.tx.nslots:
            if not p.tx.reclaim():
                if deadline is not None and time.monotonic() > deadline:
                    raise TransportTimeout(f"{p.tx.nslots - len(p.tx.free)} frames not sent within {tmo} s")
                self.device.transport.check_alive()
                time.sleep(0.0001)

    # -- receive --------------------------------------------------------------

    def release_rx(self, pair: int = 0) -> None:
        """Give the buffers of the frames last received on ``pair`` back to the device now."""
        self.queue_pair(pair).rx.recycle()

    def recv_batch(
        self, max_n: int = 64, pair: int = 0, *, with_headers: bool = False
    ) -> list[Any]:
        """Up to ``max_n`` received frames (memoryviews, see the recycling rule); [] if none.

        With ``with_headers`` each item is ``(frame, NetHdr)``.
        """
        p = self.queue_pair(pair)
        rx = p.rx
        rx.recycle()
        if max_n < 1:
            raise InvalidArgument(f"max_n must be positive, got {max_n}")
        lengths: list[int] = []
        try:
            slots = rx.fixed.reap_slots(max_n, lengths)
        except DeviceProtocolError as exc:
            # Buffers completed before the bad entry go back to the device's pool of ours.
            rx.held.extend(s for s, _ in exc.completed)  # type: ignore[misc]
            raise
        if not slots:
            return []
        out: list[Any] = []
        merged_before = 0
        view = rx.view
        views = rx.views
        held = rx.held
        bs = rx.buf_size
        h16 = rx.h16
        mrg = self.mrg_rxbuf
        nbytes = 0
        bad: list[int] = []
        for s, ln in zip(slots, lengths, strict=True):
            if rx.partial_want:
                merged_before += rx.merge_piece(s, ln, out, with_headers)
                continue
            base = bs * s
            if ln < HDR_SIZE + ETH_HLEN:
                rx.errors += 1  # the device must write a header and a frame (virtio 1.2 §5.1.6.4)
                bad.append(s)
                continue
            nb = h16[(base + 10) >> 1] if mrg else 1
            if nb == 1:
                v = view[base + HDR_SIZE : base + ln]
                views.append(v)
                held.append(s)
                nbytes += ln - HDR_SIZE
                out.append((v, NetHdr(*N.HDR.unpack_from(view, base))) if with_headers else v)
            elif 1 < nb <= rx.nslots:
                rx.partial_want = nb
                rx.partial = [(s, ln)]
            else:
                rx.errors += 1  # num_buffers 0 or beyond the ring
                bad.append(s)
        rx.frames += len(out) - merged_before
        rx.bytes += nbytes
        if bad and rx.fixed.post(bad):
            self.device.transport.notify_queue(rx.index)
        return out

    def recv(self, pair: int = 0, timeout: float | None = -1.0) -> bytes:
        """One frame as bytes (a copy), waiting up to ``timeout`` (default: the driver's)."""
        frames = self.recv_wait(1, pair, timeout)
        if not frames:
            raise TransportTimeout(f"no frame received within {self.timeout if timeout == -1.0 else timeout} s")
        data = bytes(frames[0])
        self.release_rx(pair)
        return data

    def recv_wait(self, max_n: int = 64, pair: int = 0, timeout: float | None = -1.0) -> list[memoryview]:
        """recv_batch, polling (then sleeping on the interrupt) until a frame or ``timeout``."""
        tmo = self.timeout if timeout == -1.0 else timeout
        deadline = None if tmo is None else time.monotonic() + tmo
        spins = 0
        while True:
            got = self.recv_batch(max_n, pair)
            if got:
                return got
            if deadline is not None and time.monotonic() >= deadline:
                return []
            spins += 1
            if spins < 200:
                continue
            p = self.queue_pair(pair)
            ring = p.rx.vq.ring
            try:
                if ring.enable_interrupts():
                    continue
                left = 0.05 if deadline is None else max(0.0, min(0.05, deadline - time.monotonic()))
                self.device.transport.wait_queue(p.rx.index, left)
            finally:
                ring.disable_interrupts()

    # -- asyncio --------------------------------------------------------------

    async def arecv(self, max_n: int = 64, pair: int = 0) -> list[memoryview]:
        """Wait for frames without blocking the loop (the rx queue's interrupt fd); same recycling rule."""
        while True:
            got = self.recv_batch(max_n, pair)
            if got:
                return got
            p = self.queue_pair(pair)
            ring = p.rx.vq.ring
            if ring.enable_interrupts():
                ring.disable_interrupts()
                continue
            try:
                await self._wait_fd(p.rx.index)
            finally:
                ring.disable_interrupts()

    async def asend(
        self, frames: Sequence[bytes | bytearray | memoryview], pair: int = 0, hdr: NetHdr | None = None
    ) -> int:
        """Queue every frame, waiting for transmit slots without blocking the loop; returns len(frames)."""
        done = 0
        while done < len(frames):
            n = self.send_batch(frames[done:], pair, hdr)
            done += n
            if done < len(frames) and not n:
                p = self.queue_pair(pair)
                ring = p.tx.vq.ring
                if ring.enable_interrupts():
                    ring.disable_interrupts()
                    continue
                try:
                    await self._wait_fd(p.tx.index)
                finally:
                    ring.disable_interrupts()
        return done

    async def _wait_fd(self, index: int) -> None:
        """Until the queue's interrupt fd is readable (or 50 ms pass: the device is then re-checked)."""
        fd = self.device.transport.queue_fd(index)
        if fd is None:
            await asyncio.sleep(0.001)
            return
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        ack = self.device.transport.ack_queue

        def ready() -> None:
            ack(index)
            if not fut.done():
                fut.set_result(None)

        loop.add_reader(fd, ready)
        try:
            await asyncio.wait_for(fut, 0.05)
        except TimeoutError:
            self.device.transport.check_alive()
        finally:
            loop.remove_reader(fd)


def _cfg_int(cfg: dict[str, object], key: str) -> int:
    value = cfg.get(key, 0)
    return value if isinstance(value, int) else 0


__all__ = [
    "CSUM_FEATURES",
    "DRIVER_FEATURES",
    "ETH_HLEN",
    "ETH_VLAN_HLEN",
    "HDR_SIZE",
    "NetControlError",
    "NetHdr",
    "VirtioNet",
    "build_frame",
    "format_mac",
    "inet_checksum",
    "parse_mac",
    "random_mac",
]
