"""Driver targets: VirtioBlk and VirtioScsi against a device whose every answer comes from the input.

The device is a :class:`~pyvirtio.transport.loopback.LoopbackTransport`
(in process, real shared rings) whose queue handlers read the input: for
each chain they either answer honestly (an embedded back end does the
work) or write what the input says into the device-writable buffers
(status byte, response header, sense, data) and report any number of
bytes written. The config space and the offered features come from the
input too. Once the input runs out the device answers honestly, so every
input ends.

The drivers may only answer with :class:`~pyvirtio.errors.PyvirtioError`
(``BlockIOError``/``ScsiError`` for a failed status, ``DeviceProtocolError``
for a malformed answer, ``QueueBroken`` after one, ``InvalidArgument`` when
the hostile config makes a call impossible...). Results are checked too:
a read returns exactly the bytes asked for, and every bounce buffer goes
back to the pool.
"""

from __future__ import annotations

from typing import Any

from fuzz._input import FuzzInput
from fuzz.targets import InvariantBroken, expect
from pyvirtio.backends.blk import BlockBackend, Storage
from pyvirtio.backends.scsi import ScsiBackend, ScsiLun
from pyvirtio.device import VirtioDevice
from pyvirtio.drivers.blk import VirtioBlk
from pyvirtio.drivers.net import VirtioNet
from pyvirtio.drivers.scsi import VirtioScsi
from pyvirtio.errors import InvalidArgument, PyvirtioError, TransportTimeout
from pyvirtio.ring.device_side import Chain
from pyvirtio.spec import blk as B
from pyvirtio.spec import net as N
from pyvirtio.spec import scsi as S
from pyvirtio.spec.common import DEVICE_ID_BLOCK, DEVICE_ID_NET, DEVICE_ID_SCSI, F_VERSION_1
from pyvirtio.transport.loopback import LoopbackTransport

_POOL_SIZE = 1 << 20


def _free_bytes(dev: VirtioDevice) -> int:
    return sum(arena.free_bytes for arena in dev.pool._arenas)


class _HostileBlk:
    """Queue handler of the blk target: honest or hostile per chain, as the input says."""

    def __init__(self, fi: FuzzInput, honest: BlockBackend) -> None:
        self.fi = fi
        self.honest = honest

    def __call__(self, queue: int, chain: Chain) -> int:
        fi = self.fi
        mode = fi.below(4)
        if mode == 0:
            return self.honest.handle(queue, chain)
        if mode == 1:  # honest work, any length reported
            self.honest.handle(queue, chain)
            return fi.u32()
        if mode == 2:  # any bytes in every writable buffer (status included), any length
            for buf in chain.writable:
                raw = fi.take(min(len(buf), 64))
                buf[: len(raw)] = raw
            return fi.u32() if fi.flag() else fi.u32() % (chain.writable_len + 1)
        written = self.honest.handle(queue, chain)  # honest, then a forged status byte
        if chain.writable and len(chain.writable[-1]):
            last = chain.writable[-1]
            last[len(last) - 1] = fi.u8()
        return written


def target_blk_driver(data: bytes) -> int:
    """VirtioBlk (drivers/blk.py): config, status bytes and used lengths from a hostile device.

    Input: ``u32`` offered features (VERSION_1 forced), 60 bytes of config
    space, ``u8`` queue count, ``u8`` queue size exponent, a blob (``u16``
    length) of device answers read as each request reaches the device
    (:class:`_HostileBlk`; honest once it runs out), then operations
    (``u8`` opcode: read, write, flush, get_id, discard, write-zeroes,
    readv, batch, process_completions) with their arguments.
    """
    fi = FuzzInput(data)
    features = (fi.u32() & 0xFFFFFFFF) | (1 << F_VERSION_1)
    config = fi.take(B.CONFIG_SIZE_V11)
    nq = 1 + fi.below(2)
    queue_size = 1 << (1 + fi.below(5))
    answers = FuzzInput(fi.blob(4096))
    storage = Storage(size=1 << 20)
    honest = BlockBackend(storage, num_queues=2)
    transport = LoopbackTransport(
        device_id=DEVICE_ID_BLOCK,
        features=features,
        config=config,
        num_queues=nq,
        queue_size=queue_size,
        default_handler=_HostileBlk(answers, honest),
    )
    device = VirtioDevice("fuzz-blk", transport, pool_size=_POOL_SIZE)
    done = 0
    try:
        try:
            blk = VirtioBlk(device, poll="busy", timeout=2.0)
        except InvalidArgument as exc:  # no argument was given: whatever went wrong is the device's
            raise InvariantBroken(f"VirtioBlk() blamed the caller for the device's config: {exc}") from exc
        except PyvirtioError:
            return 0
        try:
            done = _blk_ops(fi, blk, device)
        finally:
            blk.close()
    finally:
        device.close()
        storage.close()
    return done


def _blk_ops(fi: FuzzInput, blk: VirtioBlk, device: VirtioDevice) -> int:
    done = 0
    bs = min(blk.block_size, 1 << 16)
    baseline: int | None = None
    for _ in range(16):
        if fi.exhausted:
            break
        op = fi.below(9)
        offset = bs * fi.u8()
        # A hostile blk_size can be 2^31: keep the harness's own buffers small
        # (a length that is not a multiple of it is refused, which is fine).
        length = min(bs * (1 + fi.below(8)), 1 << 16)
        try:
            if op == 0:
                got = blk.read(offset, length)
                expect(isinstance(got, bytes) and len(got) == length, f"read of {length} returned {len(got)}")
            elif op == 1:
                blk.write(offset, fi.take(length))
            elif op == 2:
                blk.flush()
            elif op == 3:
                ident = blk.get_id()
                expect(isinstance(ident, str) and len(ident) <= B.ID_BYTES, f"device id {ident!r}")
            elif op == 4:
                blk.discard(offset, length)
            elif op == 5:
                blk.write_zeroes(offset, length, unmap=fi.flag())
            elif op == 6:
                lengths = [bs * (1 + fi.below(2)) for _ in range(1 + fi.below(3))]
                parts = blk.readv(offset, lengths)
                expect([len(p) for p in parts] == lengths, "readv returned the wrong lengths")
            elif op == 7:
                reqs = [blk.read_request(offset, length), blk.get_id_request(), blk.write_request(offset, bytes(bs))]
                n = blk.submit(reqs)
                blk.wait(reqs[:n])
            else:
                blk.process_completions()
            done += 1
        except TransportTimeout:
            break  # a request the device never completed: nothing more will be
        except PyvirtioError:
            pass
        ctxs = blk._queues.contexts
        if ctxs and not ctxs[0].inflight and ctxs[0].vq.ring.broken is None:
            # Indirect tables stay cached on the ring for reuse, and the queue's spare bounce buffer
            # (RequestEngine.take_bounce) for its next request: they are not leaks.
            spare = ctxs[0].spare
            free = _free_bytes(device) + sum(t.size for t in ctxs[0].vq.ring._indirect_tables.values())
            free += spare.size if spare is not None else 0
            if baseline is None:
                baseline = free
            expect(free == baseline, f"pool free bytes {free} != {baseline}: a bounce buffer leaked")
    return done


# -- virtio-scsi ---------------------------------------------------------------------


class _HostileScsi(LoopbackTransport):
    """A virtio-scsi device that answers from the input (honestly once it runs out).

    Event buffers stay posted until the input releases some
    (:meth:`process` on the event queue takes as many as it says).
    """

    def __init__(self, fi: FuzzInput, honest: ScsiBackend, **kw: Any) -> None:
        super().__init__(device_id=DEVICE_ID_SCSI, default_handler=self._request, **kw)
        self.fi = fi
        self.honest = honest
        self.handlers[S.CONTROL_QUEUE] = self._control
        self.handlers[S.EVENT_QUEUE] = self._event

    def process(self, index: int, limit: int | None = None) -> int:
        if index == S.EVENT_QUEUE:
            allowed = self.fi.below(3)
            limit = allowed if limit is None else min(limit, allowed)
            if not limit:
                return 0
        return super().process(index, limit)

    def _control(self, queue: int, chain: Chain) -> int:
        fi = self.fi
        if fi.exhausted or fi.below(2) == 0:
            return self.honest.handle(queue, chain)
        for buf in chain.writable:
            raw = fi.take(min(len(buf), 8))
            buf[: len(raw)] = raw
        return fi.u32() % (chain.writable_len + 2)

    def _event(self, _queue: int, chain: Chain) -> int:
        fi = self.fi
        raw = fi.take(S.EVENT.size)
        n = chain.write(raw)
        return fi.u32() % (n + 2) if fi.flag() else n

    def _request(self, queue: int, chain: Chain) -> int:
        fi = self.fi
        mode = 0 if fi.exhausted else fi.below(4)
        if mode == 0:
            return self.honest.handle(queue, chain)
        if mode == 1:  # honest data, forged response header and length
            written = self.honest.handle(queue, chain)
            head = fi.take(S.CMD_RESP_HDR.size)
            _write_at(chain, 0, head)
            return written if fi.flag() else fi.u32()
        # Forged header, sense and data-in: response header fields chosen so they are often valid.
        sense_len = fi.u8()
        resid = fi.u32() if fi.flag() else fi.u8()
        status = fi.choose((0x00, 0x02, 0x08, 0x28), fi.u8)
        response = fi.choose((S.S_OK, S.S_BAD_TARGET, S.S_BUSY, S.S_INCORRECT_LUN), fi.u8)
        head = S.CMD_RESP_HDR.pack(sense_len, resid, 0, status, response)
        sense = fi.blob(96)
        _write_at(chain, 0, head + sense)
        resp_size = 12 + 96  # the driver's sense_size follows the config (default 96)
        data_in = fi.blob(512)
        _write_at(chain, resp_size, data_in)
        return fi.u32() if mode == 3 else min(chain.writable_len, resp_size + len(data_in))


def _write_at(chain: Chain, offset: int, data: bytes) -> None:
    """Scatter ``data`` into the chain's writable buffers from byte ``offset``."""
    chain.write(data, offset)


def target_scsi_driver(data: bytes) -> int:
    """VirtioScsi (drivers/scsi.py): scan, I/O, events and task management against a hostile device.

    Input: ``u32`` offered features, 36 bytes of config (max_target forced
    below 2 and max_lun below 4 to bound the scan; cdb/sense sizes kept at
    the defaults unless a flag says otherwise), ``u8`` extra queues, ``u8``
    queue size exponent, a blob of device answers (scan included; honest
    once it runs out, see :class:`_HostileScsi`), then operations (``u8``
    opcode: rescan, read, write, flush, unmap, poll events, LUN reset,
    abort, raw command).
    """
    fi = FuzzInput(data)
    features = (fi.u32() & 0xFFFFFFFF) | (1 << F_VERSION_1)
    config = bytearray(fi.take(S.CONFIG_SIZE))
    if not fi.flag():
        config[20:28] = (96).to_bytes(4, "little") + (32).to_bytes(4, "little")  # sense_size, cdb_size
    config[30:32] = fi.below(2).to_bytes(2, "little")  # max_target
    config[32:36] = fi.below(4).to_bytes(4, "little")  # max_lun
    num_queues = S.FIRST_REQUEST_QUEUE + 1 + fi.below(2)
    queue_size = 1 << (2 + fi.below(4))
    answers = FuzzInput(fi.blob(4096))
    honest = ScsiBackend({(0, 0): ScsiLun(Storage(size=1 << 20)), (0, 1): ScsiLun(Storage(size=1 << 16))})
    transport = _HostileScsi(
        answers,
        honest,
        features=features,
        config=bytes(config),
        num_queues=num_queues,
        queue_size=queue_size,
    )
    device = VirtioDevice("fuzz-scsi", transport, pool_size=_POOL_SIZE)
    done = 0
    try:
        try:
            scsi = VirtioScsi(device, poll="busy", timeout=2.0)
        except TransportTimeout:
            raise
        except PyvirtioError:
            return 0
        try:
            done = len(scsi.luns) + _scsi_ops(fi, scsi)
        finally:
            scsi.close()
    finally:
        device.close()
        honest.close()
    return done


def _scsi_ops(fi: FuzzInput, scsi: VirtioScsi) -> int:
    done = 0
    for _ in range(12):
        if fi.exhausted:
            break
        op = fi.below(9)
        target, lun = fi.below(2), fi.below(4)
        try:
            if op == 0:
                scsi.rescan()
            elif op in (1, 2, 3, 4):
                disk = scsi.disk(target, lun)
                bs = disk.block_size
                offset = bs * fi.u8()
                length = bs * (1 + fi.below(4))
                if op == 1:
                    got = disk.read(offset, length)
                    expect(len(got) == length, f"read of {length} returned {len(got)} bytes")
                elif op == 2:
                    disk.write(offset, fi.take(length))
                elif op == 3:
                    disk.flush()
                else:
                    disk.unmap(offset, length)
            elif op == 5:
                transport = scsi.device.transport
                assert isinstance(transport, _HostileScsi)
                transport.process(S.EVENT_QUEUE)
                scsi.poll_events()
            elif op == 6:
                scsi.lun_reset(target, lun)
            elif op == 7:
                scsi.abort_task(target, lun, fi.u64())
            else:
                cdb = fi.blob(16) or b"\0"
                scsi.command(target, lun, cdb, data_in=fi.below(1024), check=fi.flag())
            done += 1
        except TransportTimeout:
            break
        except PyvirtioError:
            pass
    return done


# -- virtio-net ----------------------------------------------------------------------


class _HostileNet(LoopbackTransport):
    """A virtio-net device answering from the input: rx frames, tx completions, control acks.

    Receive buffers stay posted until an operation delivers some
    (:meth:`deliver`); a kick on a receive queue delivers none. The last
    queue is the control queue.
    """

    def __init__(self, fi: FuzzInput, pairs: int, **kw: Any) -> None:
        super().__init__(device_id=DEVICE_ID_NET, num_queues=2 * pairs + 1, **kw)
        self.fi = fi
        self.pairs = pairs
        for q in range(2 * pairs):
            self.handlers[q] = self._tx if q % 2 else self._rx
        self.handlers[2 * pairs] = self._control

    def process(self, index: int, limit: int | None = None) -> int:
        if index < 2 * self.pairs and index % 2 == 0 and limit is None:
            return 0  # receive buffers wait for frames
        return super().process(index, limit)

    def deliver(self, queue: int, n: int) -> int:
        if queue not in self.queues:
            return 0
        return super().process(queue, n)

    def _rx(self, _queue: int, chain: Chain) -> int:
        fi = self.fi
        hdr = fi.take(10) + fi.choose((1, 0, 2), fi.u16).to_bytes(2, "little")  # num_buffers
        frame = fi.blob(1600) if fi.flag() else bytes(60)
        n = chain.write(hdr + frame)
        return fi.u32() if fi.below(8) == 7 else n

    def _tx(self, _queue: int, _chain: Chain) -> int:
        fi = self.fi
        return fi.u32() if fi.below(16) == 15 else 0

    def _control(self, _queue: int, chain: Chain) -> int:
        fi = self.fi
        ack = fi.choose((N.CTRL_OK, N.CTRL_ERR), fi.u8)
        if chain.writable and len(chain.writable[-1]):
            last = chain.writable[-1]
            last[len(last) - 1] = ack
        return fi.u32() if fi.below(8) == 7 else 1


def _frame(fi: FuzzInput) -> bytes:
    return fi.blob(1600) if fi.flag() else b"\x02" * 6 + b"\x04" * 6 + b"\x08\x00" + bytes(46)


def target_net_driver(data: bytes) -> int:
    """VirtioNet (drivers/net.py): config, received frames and headers, tx lengths and control acks.

    Input: ``u32`` offered features (VERSION_1 forced), 24 bytes of config,
    ``u8`` pairs, ``u8`` queue size exponent, ``u8`` driver options
    (mrg_rxbuf, csum, rx buffer size), a blob of device answers
    (:class:`_HostileNet`), then operations: send, send_batch, deliver rx
    frames and receive them, recv_batch, control commands, reclaim,
    release.
    """
    fi = FuzzInput(data)
    features = (fi.u32() & 0xFFFFFFFF) | (1 << F_VERSION_1)
    config = fi.take(N.CONFIG_SIZE)
    pairs = 1 + fi.below(2)
    queue_size = 1 << (1 + fi.below(5))
    opts = fi.u8()
    answers = FuzzInput(fi.blob(4096))
    transport = _HostileNet(answers, pairs, features=features, config=config, queue_size=queue_size)
    device = VirtioDevice("fuzz-net", transport, pool_size=_POOL_SIZE)
    done = 0
    try:
        try:
            net = VirtioNet(
                device,
                mrg_rxbuf=bool(opts & 1),
                csum=bool(opts & 2),
                rx_buf_size=(256, 2048, 4096, 1600)[opts >> 2 & 3],
                timeout=0.2,
            )
        except InvalidArgument as exc:
            # Only rx_buf_size can be wrong for this device (its MTU); the rest is the device's to answer for.
            if "rx_buf_size" not in str(exc):
                raise InvariantBroken(f"VirtioNet() blamed the caller for the device's config: {exc}") from exc
            return 0
        except PyvirtioError:
            return 0
        try:
            done = _net_ops(fi, net, transport)
        finally:
            net.close()
    finally:
        device.close()
    return done


def _net_ops(fi: FuzzInput, net: VirtioNet, transport: _HostileNet) -> int:
    done = 0
    for _ in range(16):
        if fi.exhausted:
            break
        op = fi.below(8)
        pair = fi.below(net.num_pairs)
        try:
            if op == 0:
                net.send(_frame(fi), pair)
            elif op == 1:
                frames = [_frame(fi) for _ in range(1 + fi.below(4))]
                n = net.send_batch(frames, pair)
                expect(0 <= n <= len(frames), f"send_batch queued {n} of {len(frames)}")
            elif op in (2, 3):
                if op == 3:
                    transport.deliver(2 * pair, 1 + fi.below(4))
                got = net.recv_batch(1 + fi.below(8), pair, with_headers=fi.flag())
                for item in got:
                    frame = item[0] if isinstance(item, tuple) else item
                    expect(len(frame) <= net.queue_size * net.rx_buf_size, f"a {len(frame)}-byte frame")
                    bytes(frame)
            elif op == 4:
                which = fi.below(5)
                if which == 0:
                    net.set_promisc(fi.flag())
                elif which == 1:
                    net.set_allmulti(fi.flag())
                elif which == 2:
                    net.set_mac(fi.take(6))
                elif which == 3:
                    net.set_mac_table([fi.take(6)], [b"\x01" + fi.take(5)])
                else:
                    net.set_queue_pairs(1 + fi.below(net.max_pairs))
            elif op == 5:
                net.reclaim_tx(pair)
                expect(0 <= net.tx_free(pair) <= net.queue_size, "tx_free out of range")
            elif op == 6:
                net.release_rx(pair)
            else:
                net.stats()
                net.info()
                _ = net.link_up
            done += 1
        except TransportTimeout:
            break
        except PyvirtioError:
            pass
    return done
