"""Transports: how a VirtioDevice reaches a device (the seed's backend ops)."""

from pyvirtio.transport.base import QueueSetup, Transport

__all__ = ["QueueSetup", "Transport"]
