"""Embedded device back ends: device models and the vhost-user server."""
