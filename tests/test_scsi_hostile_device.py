"""VirtioScsi against a device that lies (in-process loopback, a doctored request handler).

Each test bends one field of the response the real model wrote (or skips
writing it) and asserts the driver's verdict: a response never written, an
invalid response code, a sense length beyond sense_size and a residual beyond
the buffer are the device's fault (DeviceProtocolError on that request, the
queue goes on); a transport failure with status GOOD is an error, not a
success (SPDK ignores the response code); a READ that moved less than asked
fails; a target that stays BUSY or keeps raising UNIT ATTENTION costs a
bounded number of attempts. Also the same driver over the loopback for the
plain paths, so the scan and I/O need no socket.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator

import pytest

from pyvirtio.backends.scsi import ScsiBackend, ScsiLoopback, loopback_scsi, ram_lun
from pyvirtio.device import VirtioDevice
from pyvirtio.drivers.scsi import MAX_ATTEMPTS, ScsiError, VirtioScsi
from pyvirtio.errors import DeviceProtocolError
from pyvirtio.ring.device_side import Chain
from pyvirtio.spec import scsi as S
from pyvirtio.spec import t10 as T

pytestmark = pytest.mark.timeout(30)

RESP = S.CMD_RESP_HDR  # sense_len, resid, status_qualifier, status, response


class Rig:
    """A VirtioScsi over a loopback ScsiBackend whose request-queue answers a test can doctor."""

    def __init__(self) -> None:
        self.backend = ScsiBackend({(0, 0): ram_lun(1 << 20), (1, 0): ram_lun(1 << 20)}, max_target=3)
        self.transport: ScsiLoopback = loopback_scsi(self.backend)
        self.doctor: Callable[[Chain, int], int] | None = None
        self.calls = 0
        self.transport.handlers[S.FIRST_REQUEST_QUEUE] = self._handle
        self.scsi = VirtioScsi(VirtioDevice("hostile-scsi", self.transport, pool_size=8 << 20))

    def _handle(self, queue: int, chain: Chain) -> int:
        self.calls += 1
        written = self.backend.handle(queue, chain)
        if self.doctor is not None:
            return self.doctor(chain, written)
        return written

    def close(self) -> None:
        self.scsi.close()
        self.backend.close()


@pytest.fixture
def rig() -> Iterator[Rig]:
    r = Rig()
    yield r
    r.close()


def _patch_resp(chain: Chain, **fields: int) -> None:
    """Rewrite fields of the response header the model wrote (it starts the writable part)."""
    head = bytearray(b"".join(bytes(b) for b in chain.writable)[: RESP.size])
    sense_len, resid, qual, status, response = RESP.unpack(head)
    values = {"sense_len": sense_len, "resid": resid, "qual": qual, "status": status, "response": response}
    values.update(fields)
    chain.write(RESP.pack(values["sense_len"], values["resid"], values["qual"], values["status"],
                          values["response"]))


def test_loopback_scan_and_io(rig: Rig) -> None:
    assert sorted(rig.scsi.luns) == [(0, 0), (1, 0)]
    disk = rig.scsi.disk(1, 0)
    disk.write(4096, b"L" * 4096)
    assert disk.read(4096, 4096) == b"L" * 4096


def test_response_never_written(rig: Rig) -> None:
    def skip(chain: Chain, written: int) -> int:
        chain.write(RESP.pack(0, 0, 0, 0, 0xFF))  # what the driver put there, untouched
        return written

    rig.doctor = skip
    with pytest.raises(DeviceProtocolError, match="did not write a response"):
        rig.scsi.disk(0, 0).read(0, 512)
    rig.doctor = None
    assert rig.scsi.disk(0, 0).read(0, 512) == bytes(512)  # the queue goes on


def test_invalid_response_code(rig: Rig) -> None:
    rig.doctor = lambda chain, written: (_patch_resp(chain, response=99), written)[1]
    with pytest.raises(DeviceProtocolError, match="invalid virtio-scsi response 99"):
        rig.scsi.disk(0, 0).read(0, 512)


def test_sense_length_beyond_sense_size(rig: Rig) -> None:
    rig.doctor = lambda chain, written: (_patch_resp(chain, sense_len=97), written)[1]
    with pytest.raises(DeviceProtocolError, match="sense_len 97 exceeds sense_size 96"):
        rig.scsi.disk(0, 0).read(0, 512)


def test_residual_beyond_the_buffer(rig: Rig) -> None:
    rig.doctor = lambda chain, written: (_patch_resp(chain, resid=513), written)[1]
    with pytest.raises(DeviceProtocolError, match="residual 513 exceeds the 512-byte buffer"):
        rig.scsi.disk(0, 0).read(0, 512)


def test_short_read_is_an_error(rig: Rig) -> None:
    rig.doctor = lambda chain, written: (_patch_resp(chain, resid=512), written)[1]
    with pytest.raises(ScsiError, match="short transfer"):
        rig.scsi.disk(0, 0).read(0, 1024)


def test_transport_failure_with_status_good_is_not_success(rig: Rig) -> None:
    rig.doctor = lambda chain, written: (_patch_resp(chain, response=S.S_TRANSPORT_FAILURE), written)[1]
    with pytest.raises(ScsiError) as exc:
        rig.scsi.disk(0, 0).write(0, b"w" * 512)
    assert exc.value.response_name == "TRANSPORT_FAILURE" and exc.value.status == T.GOOD


def test_busy_status_is_an_error_for_io(rig: Rig) -> None:
    rig.doctor = lambda chain, written: (_patch_resp(chain, status=T.BUSY), written)[1]
    with pytest.raises(ScsiError) as exc:
        rig.scsi.disk(0, 0).read(0, 512)
    assert exc.value.status_name == "BUSY"


def test_busy_target_costs_a_bounded_number_of_scan_attempts(rig: Rig) -> None:
    rig.doctor = lambda chain, written: (_patch_resp(chain, response=S.S_BUSY), written)[1]
    rig.calls = 0
    rig.scsi.scan([1])
    assert rig.calls == MAX_ATTEMPTS  # REPORT LUNS, five times, then the target is skipped
    assert (1, 0) not in rig.scsi.luns
    assert "BUSY" in rig.scsi.scan_errors[(1, -1)]


def test_endless_unit_attention_during_scan_is_bounded(rig: Rig) -> None:
    unit = rig.backend.luns[(1, 0)]
    unit.pending_ua.extend([T.ASC_POWER_ON_RESET] * 100)
    rig.scsi.scan([1])
    assert (1, 0) not in rig.scsi.luns
    assert "UNIT ATTENTION" in rig.scsi.scan_errors[(1, 0)]
    assert len(unit.pending_ua) >= 100 - MAX_ATTEMPTS * MAX_ATTEMPTS  # a bounded number of TURs


def test_tmf_response_never_written(rig: Rig) -> None:
    def ignore(queue: int, chain: Chain) -> int:
        return 1  # claims one byte, writes none

    rig.transport.handlers[S.CONTROL_QUEUE] = ignore
    with pytest.raises(DeviceProtocolError, match="did not write a response"):
        rig.scsi.lun_reset(0, 0)


def test_short_event_buffer_completion_is_ignored(rig: Rig) -> None:
    def short(queue: int, chain: Chain) -> int:
        chain.write(struct.pack("<I", S.T_TRANSPORT_RESET))
        return 4  # fewer than the 16 bytes of an event

    rig.transport.handlers[S.EVENT_QUEUE] = short
    rig.backend.push_event(S.T_TRANSPORT_RESET, 0, 0, S.EVT_RESET_REMOVED)
    assert rig.scsi.poll_events() == []
    assert (0, 0) in rig.scsi.luns  # nothing was removed on the strength of 4 bytes
