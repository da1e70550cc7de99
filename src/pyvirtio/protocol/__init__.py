"""Sans-I/O protocol codecs: bytes and fds in, typed messages out, no sockets.

``vhost_user`` encodes front-end requests and back-end replies of the
vhost-user protocol, frames a received byte stream into messages and checks
every message it decodes (see that module's docstring). It is the facade of
four modules, one idea each: ``vhost_user_messages`` (codes, names, layouts,
typed payloads, message records), ``vhost_user_decode`` (the request table and
the checks of what is received), ``vhost_user_encode`` (the front end's and
back end's encoders) and ``vhost_user_stream`` (stream framing and SCM_RIGHTS
helpers).
"""

from pyvirtio.protocol import vhost_user

__all__ = ["vhost_user"]
