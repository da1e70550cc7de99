"""The fuzz targets in CI: every seed, then a short Hypothesis run per target (docs/fuzzing.md).

* the seed corpus in ``fuzz/corpus/`` is exactly what ``fuzz/make_corpus.py``
  builds from the codec, the ring helpers and the device models (so the
  seeds follow the code; ``python -m fuzz.make_corpus`` rewrites them);
* each target runs every seed without a crash, and some seed of each
  target gets real work done (a message decoded, a chain served...), so
  a change of input format cannot silently turn the corpus into noise;
* each target then gets ``FUZZ_CI_SECONDS`` (default 3) of Hypothesis:
  random bytes and mutated seeds, a per-input time limit, any crash fails
  the test and is saved under ``fuzz/crashes/``. Eighteen targets take about
  a minute on a 2-core machine.

Fuzzer findings fixed in the library keep a reproducer here each (a
plain test, and the fuzzer's own input from ``fuzz/known/`` run in strict
mode). A known issue that is not fixed yet gets a strict-xfail reproducer
and an entry in ``fuzz.targets.KNOWN_ISSUES`` (docs/fuzzing.md).
"""

from __future__ import annotations

import os
import socket
import struct
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fuzz import make_corpus  # noqa: E402
from fuzz import run as fuzz_run  # noqa: E402

from pyvirtio.backends.blk import BlockBackend, Storage  # noqa: E402
from pyvirtio.backends.server import VhostUserBackend  # noqa: E402
from pyvirtio.errors import PyvirtioError  # noqa: E402
from pyvirtio.memory import Region  # noqa: E402
from pyvirtio.protocol import vhost_user as vu  # noqa: E402
from pyvirtio.spec.ring import split_layout  # noqa: E402
from pyvirtio.testing import open_fd_count  # noqa: E402

pytestmark = pytest.mark.timeout(60)

SECONDS = float(os.environ.get("FUZZ_CI_SECONDS", "3"))
TARGETS = fuzz_run.TARGET_NAMES


def test_every_target_is_registered() -> None:
    assert sorted(fuzz_run.load_targets()) == sorted(TARGETS)
    assert sorted(make_corpus.SEEDS) == sorted(TARGETS)


def test_seed_corpus_is_up_to_date() -> None:
    stale = make_corpus.stale()
    assert not stale, f"run `python -m fuzz.make_corpus` and commit: {stale}"


def test_seed_corpus_is_small() -> None:
    total = sum(p.stat().st_size for p in make_corpus.CORPUS.rglob("*") if p.is_file())
    assert total < 1 << 20


@pytest.mark.parametrize("target", TARGETS)
def test_seeds(target: str) -> None:
    results = fuzz_run.replay_corpus(target)
    assert results, f"no seeds for {target}"
    assert max(r for _p, r in results) > 0, f"no seed of {target} does useful work: {results}"


@pytest.mark.parametrize("target", TARGETS)
def test_short_fuzz(target: str) -> None:
    record = fuzz_run.run_hypothesis(target, SECONDS, seed_examples=False, examples_per_round=200)
    assert record["inputs"] > 0
    assert not record["crashes"], f"{target} crashed; inputs saved as {record['crashes']}"


# -- fixed fuzzer findings: reproducers --------------------------------------------------


def test_failed_remap_leaks_no_regions() -> None:
    """A running ring, then SET_MEM_TABLE with no regions: the connection is dropped, nothing may leak."""
    before = open_fd_count()
    storage = Storage(size=1 << 20)
    region = Region.create(64 << 10, "remap-leak")
    ours, theirs = socket.socketpair()
    backend = VhostUserBackend(BlockBackend(storage), poll_us=0)
    why: list[str] = []

    def serve() -> None:
        why.append(backend.run(theirs))
        theirs.close()  # as VhostUserServer does

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    kick = os.eventfd(0, os.EFD_CLOEXEC)
    try:
        c = vu.FrontendCodec()
        avail, used, _ = split_layout(8)
        uva = 0x7F0000000000
        for out in (
            c.set_owner(),
            c.set_mem_table([vu.MemRegion(0x100000, region.size, uva)], [region.fd]),
            c.set_vring_num(0, 8),
            c.set_vring_addr(vu.VringAddr(0, 0, uva, uva + used, uva + avail)),
            c.set_vring_kick(0, kick),  # no PROTOCOL_FEATURES: the ring starts now
            c.set_mem_table([], []),  # the ring cannot live in an empty table
        ):
            if out.fds:
                socket.send_fds(ours, [out.data], list(out.fds))
            else:
                ours.sendall(out.data)
        ours.settimeout(5)
        assert ours.recv(64) == b""  # dropped
        thread.join(5)
        assert why and "without a memory table" in why[0], why
    finally:
        ours.close()
        thread.join(5)
        theirs.close()
        os.close(kick)
        region.close()
        storage.close()
    assert open_fd_count() == before


def test_fuzz_input_server_remap_leak_strict(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fuzzer's input for the remap leak (fixed in backends/server.py) passes in strict mode."""
    monkeypatch.setenv("FUZZ_STRICT", "1")
    data = (ROOT / "fuzz" / "known" / "server-remap-leak").read_bytes()
    fuzz_run.run_one(fuzz_run.load_targets()["server"], data, 30)


def test_net_config_pairs_beyond_the_queues_do_not_blame_the_caller() -> None:
    """Config: MQ, 5 pairs; the device has 1 pair + control. Nothing the caller passed is wrong."""
    from fuzz._drivers import _HostileNet
    from fuzz._input import FuzzInput

    from pyvirtio.device import VirtioDevice
    from pyvirtio.drivers.net import VirtioNet
    from pyvirtio.errors import InvalidArgument
    from pyvirtio.spec import net as N

    config = bytes(6) + struct.pack("<HHH", N.S_LINK_UP, 5, 1500) + bytes(N.CONFIG_SIZE - 12)
    features = (1 << 32) | (1 << N.F_MQ) | (1 << N.F_CTRL_VQ) | (1 << N.F_MAC) | (1 << N.F_STATUS) | (1 << N.F_MTU)
    transport = _HostileNet(FuzzInput(b""), 1, features=features, config=config, queue_size=8)
    device = VirtioDevice("net", transport, pool_size=1 << 20)
    try:
        try:
            net = VirtioNet(device)
        except InvalidArgument as exc:
            pytest.fail(f"the device's inconsistent config was blamed on the caller: {exc}")
        except PyvirtioError:
            return  # DeviceProtocolError (or similar): the device's fault, as it should be
        net.close()  # clamped to the queues there are: also fine
    finally:
        device.close()


def test_net_mq_without_ctrl_vq_is_declined() -> None:
    """The device offers MQ (2 pairs in the config) but no CTRL_VQ, which MQ requires (virtio 1.2 §5.1.3.1).

    The driver must not accept MQ then (§2.2.1: a driver MUST NOT accept a feature that requires one it did
    not accept) and uses one pair (fixed after the fuzzer found it).
    """
    from fuzz._drivers import _HostileNet
    from fuzz._input import FuzzInput

    from pyvirtio.device import VirtioDevice
    from pyvirtio.drivers.net import VirtioNet
    from pyvirtio.spec import net as N

    config = bytes(6) + struct.pack("<HHH", N.S_LINK_UP, 2, 1500) + bytes(N.CONFIG_SIZE - 12)
    features = (1 << 32) | (1 << N.F_MQ) | (1 << N.F_MAC) | (1 << N.F_STATUS) | (1 << N.F_MTU)
    transport = _HostileNet(FuzzInput(b""), 2, features=features, config=config, queue_size=8)
    device = VirtioDevice("net", transport, pool_size=1 << 20)
    try:
        net = VirtioNet(device)
        try:
            assert not device.has_feature(N.F_MQ), "MQ negotiated without CTRL_VQ"
            assert net.num_pairs == 1
        finally:
            net.close()
    finally:
        device.close()
