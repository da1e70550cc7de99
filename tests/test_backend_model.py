"""The device-model protocols (backends/model.py): checked once, bound into ModelHooks."""

from __future__ import annotations

import pytest

from pyvirtio.backends.blk import BlockBackend, Storage
from pyvirtio.backends.model import DeviceInitiated, DeviceModel, ModelHooks
from pyvirtio.backends.net import NetBackend
from pyvirtio.backends.scsi import ScsiBackend, ram_lun
from pyvirtio.backends.server import VhostUserBackend, VhostUserServer
from pyvirtio.ring.device_side import Chain
from pyvirtio.spec import scsi as S


class Minimal:
    num_queues = 2

    def features(self) -> int:
        return 1 << 32

    def config(self) -> bytes:
        return b"abcd"

    def handle(self, queue: int, chain: Chain) -> int:
        return 0


def test_a_minimal_model_gets_the_defaults() -> None:
    model = Minimal()
    hooks = ModelHooks.of(model)
    assert isinstance(model, DeviceModel)
    assert hooks.num_queues == 2 and hooks.queue_num == 2
    assert (hooks.negotiated, hooks.set_config, hooks.reset, hooks.info, hooks.pending) == (None,) * 5
    assert hooks.gated == frozenset() and hooks.wake_fd == -1
    assert hooks.config_space is True
    assert hooks.config() == b"abcd"


def test_the_shipped_models_declare_what_they_have() -> None:
    storage = Storage(size=1 << 20)
    net = NetBackend(pairs=2)
    scsi = ScsiBackend({(0, 0): ram_lun(1 << 20)}, request_queues=2)
    try:
        blk = ModelHooks.of(BlockBackend(storage, num_queues=3))
        assert blk.info is not None and blk.negotiated is None and blk.pending is None
        assert blk.queue_num == 3
        n = ModelHooks.of(net)
        assert isinstance(net, DeviceInitiated)
        assert n.gated == frozenset({0, 2}) and n.wake_fd == net.wake_fd
        assert n.queue_num == 2 and n.num_queues == 4  # GET_QUEUE_NUM answers pairs
        assert n.negotiated is not None and n.reset is not None and n.set_config is None
        s = ModelHooks.of(scsi)
        assert s.gated == frozenset({S.EVENT_QUEUE}) and s.queue_num == 4
        assert s.set_config is not None and s.reset is not None and s.negotiated is not None  # CHANGE
    finally:
        storage.close()
        net.close()
        scsi.close()


def test_what_is_not_a_model_is_refused_once_at_construction() -> None:
    class NoHandle:
        num_queues = 1

        def features(self) -> int:
            return 0

        def config(self) -> bytes:
            return b""

    with pytest.raises(TypeError, match="lacks handle"):
        ModelHooks.of(NoHandle())
    with pytest.raises(TypeError, match="lacks handle"):
        VhostUserBackend(NoHandle())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="lacks handle"):
        VhostUserServer("/nonexistent/x.sock", NoHandle())  # type: ignore[arg-type]


def test_half_a_capability_is_refused() -> None:
    class Gated(Minimal):
        gated_queues = (0,)
        wake_fd = -1  # but no pending()

    with pytest.raises(TypeError, match="part of DeviceInitiated: it lacks pending"):
        ModelHooks.of(Gated())

    class Empty(Minimal):
        num_queues = 0

    with pytest.raises(TypeError, match="needs a queue"):
        ModelHooks.of(Empty())
