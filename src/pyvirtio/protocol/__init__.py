"""Sans-I/O protocol codecs: bytes and fds in, typed messages out, no sockets.

``vhost_user`` encodes front-end requests and back-end replies of the
vhost-user protocol, frames a received byte stream into messages and checks
every message it decodes (see that module's docstring).
"""

from pyvirtio.protocol import vhost_user

__all__ = ["vhost_user"]
