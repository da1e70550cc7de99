"""Exceptions, grouped by whose fault they are.

Every error pyvirtio raises on purpose derives from :class:`PyvirtioError`,
and falls into one of three families (docs/architecture.md, "errors say whose
fault they are"):

* the caller's: :class:`InvalidArgument` (also a :class:`ValueError`),
  :class:`QueueFull`, :class:`RequestTooLarge`, :class:`OwnershipError`,
  :class:`QueueStateError`, :class:`UsageError` (a command line that does not fit together);
* the device's: :class:`DeviceProtocolError` (a malformed reply or ring
  entry), :class:`QueueBroken`, :class:`NegotiationError`,
  :class:`BlockIOError` and its SCSI forms :class:`ScsiError` and
  :class:`LunNotFound`, :class:`NetControlError`;
* the transport's: :class:`TransportError`, :class:`ConnectionLost`,
  :class:`ReconnectFailed`, :class:`TransportTimeout`, :class:`DeviceNeedsReset` (a PCI
  device that must be reset), :class:`PciSetupError` (the host's PCI set-up).

Every exception class of the drivers, the device layer and the transports
lives here (the driver modules re-export theirs under the old names).
:class:`ScsiError` names SCSI status, sense key and ASC from
:mod:`pyvirtio.spec.t10` / :mod:`pyvirtio.spec.scsi` (pure data, the only
modules this one imports).

:class:`DriverProtocolError` is the mirror of DeviceProtocolError for the
embedded back ends: the *frontend* (driver) broke the rules
(:class:`ProtocolViolation`: the connection is dropped; :class:`ChainError`:
a malformed descriptor chain), or asked for something the device declines
(:class:`RequestRefused`: a failure ack, the connection stays). The SCSI
target emulation answers a command it cannot execute with
:class:`ScsiCheckCondition` or :class:`ScsiOverrun`.

The conformance checker (``pyvirtio check``) ends a rule with
:class:`RuleFailed` (the back end broke the rule: a device's fault, carrying
what was sent, what came back and what was expected) or :class:`RuleSkipped`
(the rule does not apply: a feature not offered).
"""

from __future__ import annotations

from pyvirtio.spec import scsi as _S
from pyvirtio.spec import t10 as _T


class PyvirtioError(Exception):
    """Base class of every error pyvirtio raises deliberately."""


# -- the caller's fault -------------------------------------------------------


class InvalidArgument(PyvirtioError, ValueError):
    """A bad argument from the caller; nothing was sent to the device."""


class UsageError(InvalidArgument):
    """A command line whose arguments do not fit together (the CLI exits with status 2, as argparse does)."""


class RequestTooLarge(InvalidArgument):
    """The request needs more descriptors than the queue can ever hold."""


class QueueFull(PyvirtioError):
    """Not enough free descriptors now; retry after reaping completions."""


class OwnershipError(PyvirtioError):
    """A queue was used or released by a thread that does not own it."""


class QueueStateError(PyvirtioError):
    """An operation that the queue's current state does not allow."""


# -- the device's fault -------------------------------------------------------


class DeviceError(PyvirtioError):
    """The device refused or failed something."""


class DeviceProtocolError(DeviceError):
    """The device broke the virtio or vhost-user rules.

    ``completed`` holds the (token, length) pairs that were valid and were
    reaped before the violation was found, so nothing acknowledged is lost.
    """

    def __init__(self, message: str, completed: list[tuple[object, int]] | None = None) -> None:
        super().__init__(message)
        self.completed: list[tuple[object, int]] = completed or []


class QueueBroken(DeviceProtocolError):
    """The queue was marked broken by an earlier violation; reset the device."""


class NegotiationError(DeviceError):
    """Feature negotiation or a device status step failed."""


class BlockIOError(DeviceError, OSError):
    """A block request completed with an error status."""

    def __init__(self, op: str, offset: int, length: int, status: int, status_name: str) -> None:
        super().__init__(f"{op} at offset {offset} length {length} failed: {status_name} (status {status})")
        self.op = op
        self.offset = offset
        self.length = length
        self.status = status
        self.status_name = status_name


class ScsiError(BlockIOError):
    """A SCSI command failed: a virtio response other than OK, a SCSI status other than GOOD.

    ``response`` / ``response_name`` are the virtio-scsi response, ``status`` /
    ``status_name`` the SCSI status, and for CHECK CONDITION ``sense`` (a
    :class:`~pyvirtio.spec.t10.Sense`), ``key`` / ``key_name``, ``asc``, ``ascq``
    and ``asc_name``.
    """

    def __init__(
        self,
        op: str,
        target: int,
        lun: int,
        *,
        response: int = _S.S_OK,
        status: int = _T.GOOD,
        sense: _T.Sense | None = None,
        offset: int = 0,
        length: int = 0,
        detail: str = "",
    ) -> None:
        status_name = _T.STATUS_NAMES.get(status, f"status 0x{status:02x}")
        super().__init__(op, offset, length, status, status_name)
        self.target = target
        self.lun = lun
        self.response = response
        self.response_name = _S.RESPONSE_NAMES.get(response, f"response {response}")
        self.sense = sense
        self.key = sense.key if sense else None
        self.key_name = sense.key_name if sense else None
        self.asc = sense.asc if sense else None
        self.ascq = sense.ascq if sense else None
        self.asc_name = sense.asc_name if sense else None
        where = f"{op} on {target}:{lun}" + (f" at offset {offset} length {length}" if length else "")
        if detail:
            why = detail
        elif response != _S.S_OK:
            why = f"virtio response {self.response_name}"
        elif sense is not None:
            why = (
                f"{status_name}, {sense.key_name} ({sense.key:#x}), {sense.asc_name} "
                f"(ASC {sense.asc:#04x} ASCQ {sense.ascq:#04x})"
            )
        else:
            why = status_name
        self.args = (f"{where} failed: {why}",)

    def __str__(self) -> str:
        return str(self.args[0])


class LunNotFound(ScsiError):
    """The target or LUN does not exist (BAD_TARGET, INCORRECT_LUN, LOGICAL UNIT NOT SUPPORTED)."""


class NetControlError(DeviceError):
    """The device answered a virtio-net control command with VIRTIO_NET_ERR (or not at all)."""


# -- the transport's fault ----------------------------------------------------


class TransportError(PyvirtioError):
    """The channel to the device failed."""


class ConnectionLost(TransportError, ConnectionError):
    """The peer went away; pending and later requests fail with this."""


class ReconnectFailed(ConnectionLost):
    """The device did not come back within the reconnect policy, or came back unable to resume."""


class TransportTimeout(TransportError, TimeoutError):
    """The peer did not answer in time."""


class DeviceNeedsReset(ConnectionLost):
    """A PCI device set DEVICE_NEEDS_RESET (virtio 1.2 §2.1.2) or was reset under the driver.

    Its queues are gone until the driver resets it; pending requests fail with this.
    """


class PciSetupError(TransportError):
    """The host does not give the PCI transport what it needs.

    The message names the missing piece: the function or its driver binding,
    a BAR, DMA memory (hugepages, locked pages), physical addresses
    (/proc/self/pagemap without CAP_SYS_ADMIN reads 0), the IOMMU group.
    """


# -- the frontend's fault (seen by the embedded back ends) --------------------


class DriverProtocolError(PyvirtioError):
    """The frontend (driver) broke the virtio or vhost-user rules."""


class ProtocolViolation(DriverProtocolError):
    """The frontend broke the vhost-user or virtio rules: the back end drops the connection."""


class ChainError(DriverProtocolError):
    """A malformed descriptor chain. ``head`` is the chain's head if it was a valid index."""

    def __init__(self, message: str, head: int | None) -> None:
        super().__init__(message)
        self.head = head


class RequestRefused(PyvirtioError):
    """A well-formed request the back end declines (SET_CONFIG of a read-only field...).

    The frontend gets a failure ack when it asked for one; the connection stays.
    """


class ScsiCheckCondition(PyvirtioError):
    """A SCSI command ends in CHECK CONDITION with this sense key / ASC / ASCQ.

    An ordinary SCSI answer (initiators probe what a target supports), raised by
    the target emulation and turned into a response by the virtio-scsi framing.
    """

    def __init__(self, key: int, code: tuple[int, int], why: str = "") -> None:
        super().__init__(why)
        self.key = key
        self.asc, self.ascq = code


class ScsiOverrun(DriverProtocolError):
    """The CDB asks for more data than the frontend's buffers hold (VIRTIO_SCSI_S_OVERRUN)."""


# -- verdicts of the conformance checker (pyvirtio check) -----------------------


class RuleFailed(DeviceError):
    """The back end under test broke a rule of the conformance catalogue.

    ``transcript``: the exchange that led there (messages sent and received,
    chains posted, completions seen; most recent last); ``got``: what came
    back; ``expected``: what the rule requires.
    """

    def __init__(self, expected: str, got: str, transcript: tuple[str, ...] = ()) -> None:
        super().__init__(f"expected {expected}; got {got}")
        self.expected = expected
        self.got = got
        self.transcript = transcript


class RuleSkipped(PyvirtioError):
    """A conformance rule does not apply to the back end under test (a feature it does not offer)."""
