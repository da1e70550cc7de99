"""VirtioScsi: the virtio-scsi host adapter (virtio 1.2 §5.6; SPDK's bdev_virtio_scsi).

Theory of operation. :class:`VirtioScsi` negotiates HOTPLUG (plus the ring
features), reads the config (num_queues, seg_max, max_sectors, cdb_size,
sense_size, max_target, max_lun) and starts queue 0 (control), queue 1
(events) and ``num_queues`` request queues. Commands run on the request
queues through the shared request engine (:mod:`.requests`,
:mod:`pyvirtio.drivers.requests`: each thread doing I/O gets a queue of its
own on first use, ``find_and_acquire(2)``). The control and event queues
belong to whichever thread does management work at the time, one at a time
(a lock, then acquire / release around it).

Config without PROTOCOL_F_CONFIG. SPDK's vhost-user-scsi target has no
config space to read: the frontend keeps it, as QEMU's vhost-user-scsi does
(:meth:`~pyvirtio.device.VirtioDevice.keep_config`). The values are QEMU's
defaults: num_queues = the back end's queues (GET_QUEUE_NUM) minus the
control and event queues, seg_max = ring size - 2, max_sectors 0xFFFF,
cmd_per_lun 128, cdb_size 32, sense_size 96, max_target 255, max_lun
16383. A driver write to that config is checked as QEMU checks it (sense and
CDB sizes cannot change: the back end would not know) and never sent.
``info()`` says where the config came from (``config_source``).

Scan (:meth:`VirtioScsi.scan`; :mod:`.scan`): REPORT LUNS per target, then
INQUIRY, TEST UNIT READY, VPD pages, READ CAPACITY, MODE SENSE per LUN; the
disks found are kept in ``scsi.luns``, what could not be used and why in
``scsi.scan_errors``. I/O on a LUN goes through :class:`~.disk.ScsiDisk`
(``scsi.disk(target, lun)``).

Task management: :meth:`VirtioScsi.lun_reset` (LOGICAL UNIT RESET) and
:meth:`~VirtioScsi.abort_task` (ABORT TASK; SPDK has none) on the control
queue. Events: buffers stay posted on the event queue; :meth:`poll_events`
reaps them, re-posts them, and turns TRANSPORT_RESET (RESCAN: the LUN is
probed; REMOVED: it is dropped), PARAM_CHANGE and EVENTS_MISSED (a full
rescan) into :class:`ScsiEvent` objects, also passed to the callbacks
registered with :meth:`~VirtioScsi.on_event`. ``scsi.event_fd`` becomes
readable when events arrive (for select / asyncio).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from pyvirtio.device import VirtioDevice, Virtqueue
from pyvirtio.drivers.scsi.disk import ScsiDisk
from pyvirtio.drivers.scsi.requests import (
    MAX_CDB_SIZE,
    MAX_SENSE_SIZE,
    RESP_SENTINEL,
    UA_RETRIES,
    ScsiRequest,
    ScsiRequestQueues,
)
from pyvirtio.drivers.scsi.scan import LunInfo, LunScanner
from pyvirtio.errors import DeviceProtocolError, InvalidArgument, LunNotFound, ScsiError, TransportTimeout
from pyvirtio.memory import Buffer
from pyvirtio.spec import scsi as S
from pyvirtio.spec import t10 as T
from pyvirtio.spec.common import DEVICE_ID_SCSI, F_RING_EVENT_IDX, F_RING_INDIRECT_DESC

#: Features the driver asks for (the transport adds its own, e.g. vhost-user's bit 30).
#: INOUT (bidirectional commands), CHANGE and T10_PI are not used.
DRIVER_FEATURES = (1 << S.F_HOTPLUG) | (1 << F_RING_EVENT_IDX) | (1 << F_RING_INDIRECT_DESC)

#: Event buffers kept posted (SPDK: 16).
EVENT_BUFFERS = 16

#: The config QEMU's vhost-user-scsi keeps for a back end without PROTOCOL_F_CONFIG
#: (hw/scsi/vhost-user-scsi.c properties and virtio_scsi_get_config): num_queues and
#: seg_max are filled in from the back end's queues and the ring size.
FRONTEND_CONFIG_DEFAULTS = {
    "max_sectors": 0xFFFF,
    "cmd_per_lun": 128,
    "event_info_size": S.EVENT.size,
    "sense_size": S.SENSE_SIZE,
    "cdb_size": S.CDB_SIZE,
    "max_channel": 0,
    "max_target": 255,
    "max_lun": 16383,
}
NO_CONFIG_REASON = "the back end has no PROTOCOL_F_CONFIG"

_TMF_NAMES = {**S.RESPONSE_NAMES, S.S_OK: "FUNCTION_COMPLETE"}


@dataclass
class ScsiEvent:
    """What an event meant: ``kind`` is added, removed, changed, reset, param_change, async, missed, unknown."""

    kind: str
    target: int = 0
    lun: int = 0
    event: int = 0
    reason: int = 0
    info: LunInfo | None = None


def frontend_config(backend_queues: int, ring_size: int) -> bytes:
    """The virtio-scsi config a frontend keeps for a back end without one (see the module docstring)."""
    return S.pack_config(
        {
            **FRONTEND_CONFIG_DEFAULTS,
            "num_queues": max(0, backend_queues - S.FIRST_REQUEST_QUEUE),
            "seg_max": max(1, ring_size - 2),
        }
    )


def check_frontend_config_write(config: Callable[[], bytes]) -> Callable[[int, bytes], None]:
    """The write check of a frontend-kept config: only sense_size / cdb_size, and only to their current value.

    QEMU's vhost-scsi-common refuses a change of either (the back end was
    never told); every other field is read-only for the driver (virtio 1.2
    §5.6.4).
    """

    def check(offset: int, data: bytes) -> None:
        writable = {20: "sense_size", 24: "cdb_size"}
        name = writable.get(offset)
        if name is None or len(data) != 4:
            raise InvalidArgument(
                f"config bytes {offset}+{len(data)} are read-only (the driver may write sense_size and cdb_size)"
            )
        current = S.parse_config(config())[name]
        value = int.from_bytes(data, "little")
        if value != current:
            raise InvalidArgument(
                f"{name} {value}: the config is kept in the frontend ({NO_CONFIG_REASON}); "
                f"the back end cannot be told of a change from {current}"
            )

    return check


class VirtioScsi(ScsiRequestQueues):
    """A virtio-scsi host adapter (see the module docstring)."""

    __slots__ = (
        "_callbacks", "_ctrl", "_event_bufs", "_mgmt_lock", "_nevents", "_scanner", "cmd_per_lun", "config",
        "config_source", "events", "features", "hotplug", "indirect", "luns", "max_lun", "max_queues",
        "max_sectors", "max_target", "max_transfer_bytes", "num_queues", "queue_size", "scan_errors", "seg_max",
    )

    def __init__(
        self,
        device: VirtioDevice,
        *,
        num_queues: int | None = None,
        queue_size: int | None = None,
        extra_features: int = 0,
        event_idx: bool = True,
        poll: str = "hybrid",
        timeout: float | None = 30.0,
        scan: bool = True,
        targets: Iterable[int] | None = None,
        ring: str = "auto",
        in_order: bool | str = "auto",
    ) -> None:
        wanted = DRIVER_FEATURES | extra_features
        if not event_idx:
            wanted &= ~(1 << F_RING_EVENT_IDX)
        features = device.reset(wanted, ring=ring, in_order=in_order)
        if not device.transport.has_config():
            ring_size = device.transport.get_queue_size(S.FIRST_REQUEST_QUEUE)
            ring_size = min(ring_size, queue_size) if queue_size else ring_size
            cfg_bytes = frontend_config(device.transport.max_queues(), ring_size)
            check = check_frontend_config_write(lambda: device.read_config(0, S.CONFIG_SIZE))
            device.keep_config(cfg_bytes, check, NO_CONFIG_REASON)
        cfg = S.parse_config(device.read_config(0, S.CONFIG_SIZE))
        cdb_size = cfg.get("cdb_size", S.CDB_SIZE)
        sense_size = cfg.get("sense_size", S.SENSE_SIZE)
        if not 16 <= cdb_size <= MAX_CDB_SIZE or sense_size > MAX_SENSE_SIZE:
            device.fail()
            raise DeviceProtocolError(
                f"device config cdb_size {cdb_size} / sense_size {sense_size} out of range "
                f"(16..{MAX_CDB_SIZE} / 0..{MAX_SENSE_SIZE})"
            )
        super().__init__(device, poll=poll, timeout=timeout, cdb_size=cdb_size, sense_size=sense_size)
        self.features = features
        self.config = cfg
        self.config_source = device.config_source
        self.seg_max = cfg.get("seg_max", 0)
        self.max_sectors = cfg.get("max_sectors", 0)
        self.cmd_per_lun = cfg.get("cmd_per_lun", 0)
        self.max_target = min(cfg.get("max_target", 255), 255)  # lun[1] is one byte
        self.max_lun = min(cfg.get("max_lun", 16383), 16383)  # single-level flat space
        self.hotplug = device.has_feature(S.F_HOTPLUG)
        transport_queues = device.transport.max_queues()
        self.max_queues = min(cfg.get("num_queues", 1) or 1, transport_queues - S.FIRST_REQUEST_QUEUE)
        if self.max_queues < 1:
            device.fail()
            raise DeviceProtocolError(
                f"the device has {transport_queues} queues; virtio-scsi needs control, event and a request queue"
            )
        nq = self.max_queues if num_queues is None else num_queues
        if not 1 <= nq <= self.max_queues:
            device.fail()
            raise InvalidArgument(f"num_queues must be 1..{self.max_queues}, got {nq}")
        device.start(nq, S.FIRST_REQUEST_QUEUE, queue_size=queue_size)
        if device.transport.kind == "pci":
            # QEMU's emulated virtio-scsi (a PCI function) counts a write's data-out bytes in the used
            # length: tolerated there (ring docs). vhost-user-scsi back ends (SPDK, ours) are held to the rule.
            for i in range(S.FIRST_REQUEST_QUEUE, S.FIRST_REQUEST_QUEUE + nq):
                device.queue(i).ring.clamp_used_len = True
        self.num_queues = nq
        self.queue_size = device.queue(S.FIRST_REQUEST_QUEUE).size
        self.indirect = device.has_feature(F_RING_INDIRECT_DESC)
        self._start_queues(S.FIRST_REQUEST_QUEUE, self.slot_size, "request queues")
        shared = sum(r.size for r in self.pool.regions)
        self.max_transfer_bytes = min(shared // 2, 0xFFFFFFFF)
        if self.max_sectors:
            self.max_transfer_bytes = min(self.max_transfer_bytes, self.max_sectors * 512)
        self._scanner = LunScanner(self.execute, self.max_lun)
        self._mgmt_lock = threading.RLock()
        self._callbacks: list[Callable[[ScsiEvent], None]] = []
        self.luns: dict[tuple[int, int], LunInfo] = {}
        #: Targets / LUNs the last scan could not use, and why.
        self.scan_errors: dict[tuple[int, int], str] = {}
        self.events: list[ScsiEvent] = []  # the last 100 events, oldest first
        self._ctrl: Buffer | None = self.allocate(64, align=64)
        nev = min(EVENT_BUFFERS, device.queue(S.EVENT_QUEUE).size)
        self._event_bufs: Buffer | None = self.allocate(S.EVENT.size * nev, align=64)
        self._nevents = nev
        try:
            with self._mgmt() as (_cq, eq):
                for i in range(nev):
                    self._post_event(eq, i)
                eq.flush()
                eq.ring.enable_interrupts()
            if scan:
                self.scan(targets)
        except BaseException:
            self._free_mgmt()
            raise

    # -- construction helpers -------------------------------------------------

    @classmethod
    def open(cls, target: str, **kw: Any) -> VirtioScsi:
        """Open ``vhost-user:PATH`` (or a plain socket path) as a virtio-scsi device.

        Transport options as :meth:`VirtioBlk.open <pyvirtio.drivers.blk.VirtioBlk.open>`
        (``reconnect``, ``server``, ``connect_timeout``; ``queue_size`` and
        ``timeout`` go to both); the rest to :class:`VirtioScsi`, ``ring``
        and ``in_order`` included (as for VirtioBlk).
        """
        from pyvirtio.targets import open_driver

        return open_driver(cls, target, DEVICE_ID_SCSI, kw)

    def close(self) -> None:
        self._close_queues()
        self._free_mgmt()
        self.device.close()

    def _free_mgmt(self) -> None:
        if self.device.closed:
            return
        for buf in (self._ctrl, self._event_bufs):
            if buf is not None:
                self.free(buf)
        self._ctrl = self._event_bufs = None

    def info(self) -> dict[str, Any]:
        out = self.device.info()
        out["scsi"] = {
            "num_queues": self.num_queues,
            "max_queues": self.max_queues,
            "seg_max": self.seg_max,
            "max_sectors": self.max_sectors,
            "cmd_per_lun": self.cmd_per_lun,
            "cdb_size": self.cdb_size,
            "sense_size": self.sense_size,
            "max_target": self.max_target,
            "max_lun": self.max_lun,
            "hotplug": self.hotplug,
            "config": self.config,
            "config_source": self.config_source,
            "luns": [info.to_dict() for _k, info in sorted(self.luns.items())],
        }
        return out

    # -- commands -----------------------------------------------------------------

    def command(
        self,
        target: int,
        lun: int,
        cdb: bytes,
        *,
        data_out: bytes | Buffer | None = None,
        data_in: int = 0,
        ua_retries: int = UA_RETRIES,
        check: bool = True,
    ) -> ScsiRequest:
        """Send any CDB to target:lun; returns the completed request (``req.data`` holds data-in)."""
        self._check_address(target, lun)
        req = ScsiRequest(target, lun, bytes(cdb), data_out=data_out, data_in=data_in, ua_retries=ua_retries)
        return self.run(req) if check else self.execute(req)

    def _check_address(self, target: int, lun: int) -> None:
        if not 0 <= target <= self.max_target or not 0 <= lun <= self.max_lun:
            raise InvalidArgument(
                f"{target}:{lun} is outside the device's targets 0..{self.max_target} and LUNs 0..{self.max_lun}"
            )

    # -- control and event queues ----------------------------------------------

    @contextlib.contextmanager
    def _mgmt(self) -> Iterator[tuple[Virtqueue, Virtqueue]]:
        """Own the control and event queues for a while (one thread at a time)."""
        with self._mgmt_lock:
            dev = self.device
            cq = dev.queue(S.CONTROL_QUEUE)
            if cq.owner == threading.get_ident():  # re-entered
                yield cq, dev.queue(S.EVENT_QUEUE)
                return
            cq = dev.acquire(S.CONTROL_QUEUE)
            try:
                eq = dev.acquire(S.EVENT_QUEUE)
                try:
                    yield cq, eq
                finally:
                    dev.release(S.EVENT_QUEUE)
            finally:
                dev.release(S.CONTROL_QUEUE)

    def _post_event(self, eq: Virtqueue, i: int) -> None:
        assert self._event_bufs is not None
        eq.start(i, 1)
        eq.add(self._event_bufs.addr + S.EVENT.size * i, S.EVENT.size, True)

    @property
    def event_fd(self) -> int | None:
        """Readable when the device may have delivered events: then call :meth:`poll_events`."""
        return self.device.queue(S.EVENT_QUEUE).fd

    def on_event(self, callback: Callable[[ScsiEvent], None]) -> None:
        """Call ``callback(event)`` for every :class:`ScsiEvent` that :meth:`poll_events` produces."""
        self._callbacks.append(callback)

    def poll_events(self, timeout: float = 0.0) -> list[ScsiEvent]:
        """Reap event buffers (waiting up to ``timeout`` s for one), act on them, re-post them."""
        raw: list[tuple[int, bytes, int]] = []
        with self._mgmt() as (_cq, eq):
            # Acknowledged here, so that event_fd is level-meaningful for select.
            self.device.transport.ack_queue(eq.index)
            done = eq.reap()
            if not done and timeout > 0:
                done = eq.wait(timeout)
            assert self._event_bufs is not None
            view = self._event_bufs.view
            for token, written in done:
                assert isinstance(token, int)
                if written >= S.EVENT.size:
                    ev, lun8, reason = S.EVENT.unpack_from(view, S.EVENT.size * token)
                    raw.append((ev, bytes(lun8), reason))
                self._post_event(eq, token)
            if done:
                eq.flush()
            if eq.ring.enable_interrupts():
                pass  # more already there: event_fd stays meaningful, the next poll reaps them
        out: list[ScsiEvent] = []
        for ev, lun8, reason in raw:
            out.extend(self._on_raw_event(ev, lun8, reason))
        for e in out:
            self.events.append(e)
            for cb in list(self._callbacks):
                cb(e)
        del self.events[:-100]
        return out

    def _on_raw_event(self, event: int, lun8: bytes, reason: int) -> list[ScsiEvent]:
        missed = bool(event & S.T_EVENTS_MISSED)
        event &= ~S.T_EVENTS_MISSED
        out: list[ScsiEvent] = []
        if event != S.T_NO_EVENT and lun8[0] != 1:
            out.append(ScsiEvent("unknown", event=event, reason=reason))
        elif event == S.T_TRANSPORT_RESET:
            target, lun = S.decode_lun_address(lun8)
            if reason == S.EVT_RESET_RESCAN:
                out.extend(self._rescan_lun(target, lun))
            elif reason == S.EVT_RESET_REMOVED:
                info = self.luns.pop((target, lun), None)
                out.append(ScsiEvent("removed", target, lun, event, reason, info))
            else:
                out.append(ScsiEvent("reset", target, lun, event, reason))
        elif event == S.T_PARAM_CHANGE:
            target, lun = S.decode_lun_address(lun8)
            out.append(ScsiEvent("param_change", target, lun, event, reason, self.luns.get((target, lun))))
            asc, ascq = reason & 0xFF, reason >> 8 & 0xFF
            if (target, lun) in self.luns and (asc, ascq) in (T.ASC_CAPACITY_CHANGED, T.ASC_REPORTED_LUNS_CHANGED):
                out.extend(self._rescan_lun(target, lun))
        elif event == S.T_ASYNC_NOTIFY:
            target, lun = S.decode_lun_address(lun8)
            out.append(ScsiEvent("async", target, lun, event, reason))
        elif event != S.T_NO_EVENT:
            out.append(ScsiEvent("unknown", event=event, reason=reason))
        if missed:
            out.append(ScsiEvent("missed", event=S.T_EVENTS_MISSED))
            out.extend(self.rescan())
        return out

    def _rescan_lun(self, target: int, lun: int) -> list[ScsiEvent]:
        old = self.luns.get((target, lun))
        try:
            info = self.probe_lun(target, lun)
        except ScsiError:
            info = None
        if info is None or not info.is_disk:
            if old is not None:
                del self.luns[(target, lun)]
                return [ScsiEvent("removed", target, lun, S.T_TRANSPORT_RESET, S.EVT_RESET_RESCAN, old)]
            return []
        self.luns[(target, lun)] = info
        if old is not None and old.geometry == info.geometry:
            return []  # a RESCAN of a LUN we know, unchanged (a stale event, say)
        kind = "added" if old is None else "changed"
        return [ScsiEvent(kind, target, lun, S.T_TRANSPORT_RESET, S.EVT_RESET_RESCAN, info)]

    # -- task management -------------------------------------------------------

    def task_management(self, subtype: int, target: int, lun: int, tag: int = 0, timeout: float | None = -1.0) -> int:
        """Send one TMF on the control queue; returns the virtio response code."""
        self._check_address(target, lun)
        tmo = self.timeout if timeout == -1.0 else timeout
        with self._mgmt() as (cq, _eq):
            buf = self._ctrl
            assert buf is not None
            S.CTRL_TMF_REQ.pack_into(buf.view, 0, S.T_TMF, subtype, S.lun_address(target, lun), tag)
            buf.view[32] = RESP_SENTINEL
            token = ("tmf", subtype, tag)
            cq.start(token, 2)
            cq.add(buf.addr, S.CTRL_TMF_REQ.size, False)
            cq.add(buf.addr + 32, S.CTRL_TMF_RESP_SIZE, True)
            cq.flush()
            deadline = None if tmo is None else time.monotonic() + tmo
            while True:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TransportTimeout(f"task management function {subtype} not answered within {tmo} s")
                done = cq.wait(min(left, 0.1) if left is not None else 0.1)
                if any(t is token for t, _n in done):
                    written = next(n for t, n in done if t is token)
                    break
                self.device.transport.check_alive()
            response = buf.view[32]
        if written < 1 or response == RESP_SENTINEL:
            raise DeviceProtocolError(f"TMF {subtype} on {target}:{lun}: the device did not write a response")
        if response not in S.RESPONSE_NAMES:
            raise DeviceProtocolError(f"TMF {subtype} on {target}:{lun}: invalid response {response}")
        return int(response)

    def lun_reset(self, target: int, lun: int) -> None:
        """LOGICAL UNIT RESET; raises ScsiError unless the device completed it."""
        response = self.task_management(S.T_TMF_LOGICAL_UNIT_RESET, target, lun)
        if response not in (S.S_OK, S.S_FUNCTION_SUCCEEDED):
            cls = LunNotFound if response in (S.S_BAD_TARGET, S.S_INCORRECT_LUN) else ScsiError
            raise cls("LOGICAL UNIT RESET", target, lun, response=response)

    def abort_task(self, target: int, lun: int, tag: int) -> str:
        """ABORT TASK for the command with ``tag`` (``req.tag``); returns the response name.

        FUNCTION_COMPLETE means aborted, or not found (it had completed):
        SAM-5 §7.2 does not tell them apart.
        """
        response = self.task_management(S.T_TMF_ABORT_TASK, target, lun, tag)
        if response in (S.S_BAD_TARGET, S.S_INCORRECT_LUN):
            raise LunNotFound("ABORT TASK", target, lun, response=response)
        return _TMF_NAMES[response]

    # -- scan -------------------------------------------------------------------

    def report_luns(self, target: int) -> list[int]:
        """The LUNs of ``target`` (REPORT LUNS; [0] if the target does not support it)."""
        return self._scanner.report_luns(target)

    def probe_lun(self, target: int, lun: int) -> LunInfo | None:
        """INQUIRY, TEST UNIT READY, VPD pages, READ CAPACITY of one LUN; None if nothing is there."""
        self._check_address(target, lun)
        return self._scanner.probe_lun(target, lun)

    def scan(self, targets: Iterable[int] | None = None) -> list[LunInfo]:
        """Scan ``targets`` (default 0..max_target); returns the disks found, also kept in ``self.luns``."""
        wanted = range(self.max_target + 1) if targets is None else list(targets)
        found: list[LunInfo] = []
        for t in wanted:
            if not 0 <= t <= self.max_target:
                raise InvalidArgument(f"target {t} is outside 0..{self.max_target}")
            fresh, errors = self._scanner.scan_target(t)
            for key in [k for k in self.scan_errors if k[0] == t]:
                del self.scan_errors[key]
            self.scan_errors.update(errors)
            for key in [k for k in self.luns if k[0] == t]:
                del self.luns[key]
            self.luns.update(fresh)
            found.extend(fresh.values())
        return found

    def rescan(self, targets: Iterable[int] | None = None) -> list[ScsiEvent]:
        """Scan again; returns what changed (added / removed / changed LUNs)."""
        before = dict(self.luns)
        self.scan(targets)
        out: list[ScsiEvent] = []
        for key, info in self.luns.items():
            old = before.get(key)
            if old is None:
                out.append(ScsiEvent("added", key[0], key[1], info=info))
            elif old.geometry != info.geometry:
                out.append(ScsiEvent("changed", key[0], key[1], info=info))
        for key, old in before.items():
            if key not in self.luns:
                out.append(ScsiEvent("removed", key[0], key[1], info=old))
        return out

    # -- LUN handles -------------------------------------------------------------

    def disk(self, target: int, lun: int) -> ScsiDisk:
        """A handle for I/O on target:lun (probed now if the scan did not find it)."""
        info = self.luns.get((target, lun))
        if info is None:
            info = self.probe_lun(target, lun)
            if info is None or not info.is_disk:
                raise LunNotFound("INQUIRY", target, lun, detail="no disk at this address")
            self.luns[(target, lun)] = info
        return ScsiDisk(self, info)


__all__ = ["DRIVER_FEATURES", "EVENT_BUFFERS", "FRONTEND_CONFIG_DEFAULTS", "ScsiEvent", "VirtioScsi", "frontend_config"]
