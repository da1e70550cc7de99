"""vhost-user-net: the frontend's share of a virtio-net device.

Theory of operation. A vhost-user net back end (DPDK's vhost PMD,
``pyvirtio serve net``) runs only the data queues: receive and transmit
rings of each queue pair. The rest of the virtio-net device lives in the
frontend, in QEMU and in DPDK's virtio-user alike (virtio-user strips
VIRTIO_NET_F_CTRL_VQ before SET_FEATURES: "devices do not really need to
know"): the *control queue* and, when the back end has no
PROTOCOL_F_CONFIG, the config space. :class:`VhostUserNetTransport` is that
share, wrapped around a :class:`~pyvirtio.transport.vhost_user.VhostUserTransport`:

* Queues 0 .. 2N-1 (N = :attr:`pairs`, rx0, tx0, rx1, tx1 ...; virtio 1.2
  §5.1.2) go to the back end; queue 2N, the control queue, is a real ring
  (split or packed, as negotiated) in the driver's memory whose device side
  (a bounds-checked :class:`~pyvirtio.ring.base.DeviceRing`) runs in this
  process, synchronously, when the driver kicks it.
* Control commands (virtio 1.2 §5.1.6.5): ``MQ VQ_PAIRS_SET`` enables the
  rings of the first n pairs on the back end and disables the others
  (SET_VRING_ENABLE, as QEMU does); ``RX`` modes, ``MAC ADDR_SET`` and
  ``MAC TABLE_SET`` are recorded and acknowledged, as DPDK's virtio-user does
  (a vhost back end filters nothing); anything else gets VIRTIO_NET_ERR.
  Malformed commands (too short, too long, no ack byte) also get ERR.
* Features: CTRL_VQ, CTRL_RX and CTRL_MAC_ADDR are offered by the frontend
  and never sent to the back end; MQ is offered when N > 1 and the back end
  offers it. MAC, STATUS, MTU and SPEED_DUPLEX live in the config space, so
  they are offered only when the back end answers GET_CONFIG
  (PROTOCOL_F_CONFIG); DPDK's vhost PMD does not, so against it the driver
  picks its own MAC and assumes the link is up.
* Config: the back end's when it has one, with ``max_virtqueue_pairs`` set
  to N (and ``mac`` to the last ADDR_SET); otherwise one made here that has
  only ``max_virtqueue_pairs``.

N is chosen when the transport is made (QEMU's ``queues=`` works the same
way): GET_QUEUE_NUM answers queue *pairs* for net back ends (DPDK answers
its maximum, 128; QEMU compares it with its pair count), so N may not
exceed it.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Callable
from typing import Any

from pyvirtio.errors import InvalidArgument, QueueStateError
from pyvirtio.memory import MemoryPool, MemoryTable
from pyvirtio.protocol import vhost_user as vu
from pyvirtio.ring.base import DeviceRing
from pyvirtio.ring.device_side import ChainError, open_device_ring
from pyvirtio.spec import net as N
from pyvirtio.spec.common import (
    DEVICE_ID_NET,
    F_IN_ORDER,
    F_RING_EVENT_IDX,
    F_RING_INDIRECT_DESC,
    STATUS_DRIVER_OK,
)
from pyvirtio.transport.base import QueueSetup
from pyvirtio.transport.vhost_user import VhostUserTransport

#: Features the frontend implements itself; never sent to the back end.
FRONTEND_FEATURES = (1 << N.F_CTRL_VQ) | (1 << N.F_CTRL_RX) | (1 << N.F_CTRL_MAC_ADDR)
#: Features whose fields are in the config space: offered only if the back end answers GET_CONFIG.
CONFIG_FEATURES = (1 << N.F_MAC) | (1 << N.F_STATUS) | (1 << N.F_MTU) | (1 << N.F_SPEED_DUPLEX)
#: Other control-queue features this frontend does not implement (hidden from the driver).
UNSUPPORTED_CTRL = (
    (1 << N.F_CTRL_VLAN)
    | (1 << N.F_CTRL_RX_EXTRA)
    | (1 << N.F_GUEST_ANNOUNCE)
    | (1 << N.F_CTRL_GUEST_OFFLOADS)
    | (1 << N.F_RSS)
    | (1 << N.F_HASH_REPORT)
)
CTRL_QUEUE_SIZE = 64
_MAX_CTRL_PAYLOAD = 4096  # MAC tables of up to ~680 entries; more is refused

RX_MODE_NAMES = {
    N.CTRL_RX_PROMISC: "promisc",
    N.CTRL_RX_ALLMULTI: "allmulti",
    N.CTRL_RX_ALLUNI: "alluni",
    N.CTRL_RX_NOMULTI: "nomulti",
    N.CTRL_RX_NOUNI: "nouni",
    N.CTRL_RX_NOBCAST: "nobcast",
}


class VhostUserNetTransport:
    """A virtio-net device over a vhost-user-net back end (see the module docstring).

    ``inner`` is a connected :class:`VhostUserTransport`; ``pairs`` the
    queue pairs the device has. The transport owns ``inner`` (closes it).
    """

    kind = "user"

    def __init__(self, inner: VhostUserTransport, *, pairs: int = 1) -> None:
        if pairs < 1:
            raise InvalidArgument(f"queue pairs must be at least 1, got {pairs}")
        mq_protocol = bool(inner.protocol_features >> vu.PROTOCOL_F_MQ & 1)
        self.backend_pairs = inner.max_queues() if mq_protocol else 1
        if pairs > self.backend_pairs:
            raise InvalidArgument(
                f"{pairs} queue pairs asked; the back end at {inner.path} serves at most {self.backend_pairs}"
            )
        self.inner = inner
        self.pairs = pairs
        self.ctrl_index = 2 * pairs
        #: The back end answers GET_CONFIG (else the config is made here).
        self.backend_config = inner.has_config()
        offered = inner.get_features() & ~(FRONTEND_FEATURES | UNSUPPORTED_CTRL)
        if not self.backend_config:
            offered &= ~CONFIG_FEATURES
        if pairs == 1:
            offered &= ~(1 << N.F_MQ)
        self._offered = offered | FRONTEND_FEATURES
        self._features = 0
        self._pool: MemoryPool | None = None
        self._table: MemoryTable | None = None
        self._ctrl: DeviceRing | None = None
        self._enabled: set[int] = set()
        self._running = False
        self._reset_state()

    def _reset_state(self) -> None:
        #: The device state the control queue changes (virtio 1.2 §5.1.6.5).
        self.active_pairs = 1
        self.rx_mode: dict[str, bool] = {name: False for name in RX_MODE_NAMES.values()}
        self.mac: bytes | None = None
        self.mac_table: tuple[list[bytes], list[bytes]] = ([], [])
        self.ctrl_commands = 0

    # -- features, status, config ---------------------------------------------

    def device_type(self) -> int:
        return DEVICE_ID_NET

    def get_features(self) -> int:
        return self._offered

    def set_features(self, features: int) -> None:
        if features & ~self._offered:
            raise InvalidArgument(f"features 0x{features & ~self._offered:x} were not offered")
        self._features = features
        self.inner.set_features(features & ~FRONTEND_FEATURES)

    def get_status(self) -> int:
        return self.inner.get_status()

    def set_status(self, status: int) -> None:
        if status == 0:
            self._reset_state()
            self._enabled.clear()
        was_running = self._running
        self.inner.set_status(status)
        self._running = bool(status & STATUS_DRIVER_OK)
        if self._running and not was_running:
            self._apply_pairs(1)  # only pair 0 runs until VQ_PAIRS_SET (virtio 1.2 §5.1.6.5.5)

    def _config(self) -> bytearray:
        if self.backend_config:
            cfg = bytearray(self.inner.read_config(0, N.CONFIG_SIZE))
        else:
            cfg = bytearray(N.CONFIG_SIZE)
        struct.pack_into("<H", cfg, 8, self.pairs)
        if self.mac is not None:
            cfg[0:6] = self.mac
        return cfg

    def read_config(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0 or offset + length > N.CONFIG_SIZE:
            raise InvalidArgument(f"config read {offset}+{length} outside the {N.CONFIG_SIZE}-byte net config")
        return bytes(self._config()[offset : offset + length])

    def write_config(self, offset: int, data: bytes) -> None:
        # virtio 1.2 §5.1.4: every net config field is read-only for the driver.
        raise InvalidArgument("the virtio-net config space is read-only")

    # -- queues ----------------------------------------------------------------

    def get_queue_size(self, index: int) -> int:
        if 0 <= index < self.ctrl_index:
            return self.inner.queue_size
        if index == self.ctrl_index:
            return CTRL_QUEUE_SIZE
        return 0

    def max_queues(self) -> int:
        return self.ctrl_index + 1

    def set_memory(self, pool: MemoryPool) -> None:
        self._pool = pool
        self._table = MemoryTable.from_pool(pool)
        self.inner.set_memory(pool)

    def setup_queue(self, setup: QueueSetup) -> None:
        if setup.index != self.ctrl_index:
            self.inner.setup_queue(setup)
            self._enabled.add(setup.index)  # the inner transport enables every ring it starts
            return
        if not self._features >> N.F_CTRL_VQ & 1:
            raise QueueStateError("the control queue needs VIRTIO_NET_F_CTRL_VQ negotiated")
        if self._ctrl is not None:
            raise QueueStateError(f"queue {setup.index} is already set up")
        if self._pool is None:
            raise QueueStateError("set_memory() must come before setup_queue()")
        # The pool may have grown since set_memory: translate over all of it.
        self._table = MemoryTable.from_pool(self._pool)
        self._ctrl = open_device_ring(
            setup.format,
            self._table,
            setup.size,
            setup.desc_addr,
            setup.avail_addr,
            setup.used_addr,
            base=setup.base,
            index=setup.index,
            event_idx=bool(self._features >> F_RING_EVENT_IDX & 1),
            indirect=bool(self._features >> F_RING_INDIRECT_DESC & 1),
            in_order=bool(self._features >> F_IN_ORDER & 1),
            max_chain=8,
        )
        self._ctrl.enable_notifications()  # every command is kicked: it runs during the kick

    def del_queue(self, index: int) -> None:
        if index == self.ctrl_index:
            if self._ctrl is not None:
                self._ctrl.release()
                self._ctrl = None
            return
        self._enabled.discard(index)
        self.inner.del_queue(index)

    def notify_queue(self, index: int) -> None:
        if index == self.ctrl_index:
            self._run_ctrl()
        else:
            self.inner.notify_queue(index)

    def notifier(self, index: int) -> Callable[[], None]:
        if index == self.ctrl_index:
            return functools.partial(self._run_ctrl)
        return self.inner.notifier(index)

    def wait_queue(self, index: int, timeout: float | None) -> bool:
        if index == self.ctrl_index:
            self.inner.check_alive()
            return True  # commands complete during the kick
        return self.inner.wait_queue(index, timeout)

    def queue_fd(self, index: int) -> int | None:
        return None if index == self.ctrl_index else self.inner.queue_fd(index)

    def ack_queue(self, index: int) -> None:
        if index != self.ctrl_index:  # the control queue has no signal: it completes during the kick
            self.inner.ack_queue(index)

    def has_config(self) -> bool:
        return True  # the back end's, or one made here (see the module docstring)

    def check_alive(self) -> None:
        self.inner.check_alive()

    def close(self) -> None:
        if self._ctrl is not None:
            self._ctrl.release()
            self._ctrl = None
        self.inner.close()

    def info(self) -> dict[str, Any]:
        out = self.inner.info()
        out["net"] = {
            "control_queue": "emulated by the frontend",
            "config": "back end" if self.backend_config else "emulated by the frontend",
            "pairs": self.pairs,
            "backend_pairs": self.backend_pairs,
            "active_pairs": self.active_pairs,
            "rx_mode": dict(self.rx_mode),
            "mac": None if self.mac is None else self.mac.hex(":"),
            "ctrl_commands": self.ctrl_commands,
        }
        return out

    # -- the control queue's device side --------------------------------------

    def _run_ctrl(self) -> None:
        q = self._ctrl
        if q is None:
            raise QueueStateError(f"queue {self.ctrl_index} is not set up")
        done = 0
        while True:
            try:
                chain = q.pop()
            except ChainError as exc:
                if exc.head is None:
                    raise QueueStateError(f"control queue: {exc}") from None
                q.add_used(exc.head, 0)  # malformed chain: completed with nothing written
                done += 1
                continue
            if chain is None:
                break
            cmd = chain.read_all()
            status = N.CTRL_ERR
            if len(cmd) >= 2 and chain.writable and len(chain.writable[-1]) >= 1:
                status = self._command(cmd[0], cmd[1], cmd[2:])
            written = 0
            if chain.writable and len(chain.writable[-1]) >= 1:
                ack = chain.writable[-1]
                ack[len(ack) - 1] = status
                written = chain.writable_len
            q.add_used(chain.head, written)
            self.ctrl_commands += 1
            done += 1
        if done:
            q.flush_used()
        q.enable_notifications()

    def _command(self, cls: int, cmd: int, data: bytes) -> int:
        f = self._features
        if len(data) > _MAX_CTRL_PAYLOAD:
            return N.CTRL_ERR
        if cls == N.CTRL_RX and f >> N.F_CTRL_RX & 1:
            name = RX_MODE_NAMES.get(cmd)
            # virtio 1.2 §5.1.6.5.1: one byte, 0 off, 1 on. The extra modes need CTRL_RX_EXTRA.
            if name is None or cmd > N.CTRL_RX_ALLMULTI or len(data) != 1 or data[0] > 1:
                return N.CTRL_ERR
            self.rx_mode[name] = bool(data[0])
            return N.CTRL_OK
        if cls == N.CTRL_MAC:
            if cmd == N.CTRL_MAC_ADDR_SET and f >> N.F_CTRL_MAC_ADDR & 1 and len(data) == 6:
                self.mac = bytes(data)
                return N.CTRL_OK
            if cmd == N.CTRL_MAC_TABLE_SET and f >> N.F_CTRL_RX & 1:
                tables = _parse_mac_tables(data)
                if tables is None:
                    return N.CTRL_ERR
                self.mac_table = tables
                return N.CTRL_OK
            return N.CTRL_ERR
        if cls == N.CTRL_MQ and cmd == N.CTRL_MQ_VQ_PAIRS_SET and f >> N.F_MQ & 1:
            if len(data) != 2:
                return N.CTRL_ERR
            (n,) = struct.unpack("<H", data)
            if not N.CTRL_MQ_VQ_PAIRS_MIN <= n <= self.pairs:
                return N.CTRL_ERR
            self._apply_pairs(n)
            return N.CTRL_OK
        return N.CTRL_ERR

    def _apply_pairs(self, n: int) -> None:
        """Enable the back end's rings of pairs < n, disable the others (QEMU's vhost_set_vring_enable)."""
        self.active_pairs = n
        for index in sorted(self.inner_queues()):
            want = index // 2 < n
            if want != (index in self._enabled):
                self._set_ring_enabled(index, want)

    def inner_queues(self) -> list[int]:
        """Indices of the back end's rings that are set up."""
        return [i for i in range(self.ctrl_index) if self.inner.queue_fd(i) is not None]

    def _set_ring_enabled(self, index: int, enabled: bool) -> None:
        if not self.inner.enable_queue(index, enabled):
            return  # without PROTOCOL_FEATURES rings cannot be disabled (vhost-user.rst)
        if enabled:
            self._enabled.add(index)
        else:
            self._enabled.discard(index)


def _parse_mac_tables(data: bytes) -> tuple[list[bytes], list[bytes]] | None:
    """virtio 1.2 §5.1.6.5.2: two tables {le32 entries; u8 macs[entries][6]}, unicast then multicast."""
    tables: list[list[bytes]] = []
    pos = 0
    for _ in range(2):
        if pos + 4 > len(data):
            return None
        (n,) = struct.unpack_from("<I", data, pos)
        pos += 4
        if pos + 6 * n > len(data):
            return None
        tables.append([bytes(data[pos + 6 * i : pos + 6 * i + 6]) for i in range(n)])
        pos += 6 * n
    if pos != len(data):
        return None
    return tables[0], tables[1]


__all__ = ["CONFIG_FEATURES", "FRONTEND_FEATURES", "VhostUserNetTransport"]
