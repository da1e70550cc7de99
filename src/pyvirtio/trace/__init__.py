"""``pyvirtio trace``: see the conversation between a vhost-user frontend and a back end.

:mod:`pyvirtio.trace.decoder` is the sans-I/O part (bytes and fds in, framed
messages and decoded events out, replies matched to their requests);
:mod:`pyvirtio.trace.proxy` the I/O part (a Unix-socket proxy that forwards
every message and fd unchanged); :mod:`pyvirtio.trace.rings` samples the
rings through read-only mappings of the frontend's memory (``--rings``).
The package sits at layer 3 of docs/architecture.md, beside ``transport/``
and ``backends/``: it speaks vhost-user over sockets on the codec
(:mod:`pyvirtio.protocol.vhost_user`) and needs nothing of the device or
the drivers.
"""

from pyvirtio.trace.decoder import Decoder, Event, Frame, SessionState, Source
from pyvirtio.trace.proxy import TraceItem, TraceProxy
from pyvirtio.trace.rings import RingSample, RingWatcher

__all__ = [
    "Decoder",
    "Event",
    "Frame",
    "RingSample",
    "RingWatcher",
    "SessionState",
    "Source",
    "TraceItem",
    "TraceProxy",
]
