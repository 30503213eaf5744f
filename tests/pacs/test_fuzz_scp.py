"""Property: the bridge's C-STORE handler answers every damaged instance, and goes on.

A real bridge listens on 127.0.0.1; a pynetdicom SCU sends damaged real instances over one
association, streaming each file's data set as it is on disk (the file meta stays intact, so
the damage reaches the listener rather than stopping the sender). Every instance gets a
status, success only for one that the bridge can file, and the association is never aborted.
"""

from __future__ import annotations

import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings

from medvision.pacs.bridge import CANNOT_UNDERSTAND, Bridge
from medvision.pacs.config import BridgeConfig, Peer, Route

from fuzzing import Damage, corpus, damaged, layout_of

pytestmark = [pytest.mark.integration, pytest.mark.filterwarnings("ignore::UserWarning")]

_COMMON = {"deadline": None, "database": None,
           "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large,
                                     HealthCheck.function_scoped_fixture]}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Sender:
    """One association to the bridge with a context for every corpus file."""

    def __init__(self, port: int) -> None:
        from pynetdicom import AE, _config

        # Stream each file's encoded data set as it is, without decoding it here first.
        _config.STORE_SEND_CHUNKED_DATASET = True

        self.port = port
        self.ae = AE(ae_title="FUZZER")
        for context in {(layout.sop_class, layout.transfer_syntax) for layout in corpus()}:
            self.ae.add_requested_context(*context)
        self.assoc = self.ae.associate("127.0.0.1", port, ae_title="MEDVISION")
        assert self.assoc.is_established

    def send(self, path: Path) -> int:
        status = self.assoc.send_c_store(path)
        assert self.assoc.is_established, "the bridge aborted the association"
        assert "Status" in status, "no response from the bridge"
        return int(status.Status)


@pytest.fixture(scope="module")
def sender(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sender]:
    port = _free_port()
    config = BridgeConfig(
        ae_title="MEDVISION", port=port, allowed_calling_aes=("FUZZER",), quiet_period_s=3600,
        destination=Peer(ae_title="NOWHERE", host="127.0.0.1", port=_free_port()),
        routes=(Route(pipeline="chest-xray-pneumonia", modalities=("XA",)),))
    bridge = Bridge(config, tmp_path_factory.mktemp("bridge"))
    bridge.start()
    client = Sender(port)
    client.spool = bridge.store.spool  # type: ignore[attr-defined]
    yield client
    client.assoc.release()
    bridge.stop()
    from pynetdicom import _config

    _config.STORE_SEND_CHUNKED_DATASET = False


def _spooled(spool: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in spool.rglob("*") if p.is_file()}


def _check(damage: Damage, sender: Sender) -> None:
    import pydicom

    layout = layout_of(damage.source)
    body = damage.data[layout.meta_end:] if len(damage.data) > layout.meta_end else b""
    spool: Path = sender.spool  # type: ignore[attr-defined]
    before = _spooled(spool)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "damaged.dcm"
        path.write_bytes(layout.data[:layout.meta_end] + body)
        status = sender.send(path)
    # the disk is not full here: a damaged instance is either filed or refused as not
    # understood, never "out of resources"
    assert status in (0x0000, CANNOT_UNDERSTAND), (damage, hex(status))
    filed = [p for p, stamp in _spooled(spool).items() if before.get(p) != stamp]
    if status == 0x0000:  # success only for an instance that was filed and reads back
        assert filed, (damage, "success answered, nothing filed")
        for written in filed:
            pydicom.dcmread(written)
    else:  # refused: nothing of it kept
        assert not filed, (damage, filed)
    event(f"status 0x{status:04X}")


@settings(max_examples=150, derandomize=True, **_COMMON)
@given(damage=damaged())
def test_every_damaged_instance_gets_a_status(damage: Damage, sender: Sender) -> None:
    _check(damage, sender)


@pytest.mark.slow
@settings(max_examples=3000, **_COMMON)
@given(damage=damaged())
def test_every_damaged_instance_gets_a_status_long(damage: Damage, sender: Sender) -> None:
    _check(damage, sender)


def test_the_listener_still_files_clean_instances_afterwards(sender: Sender) -> None:
    with tempfile.TemporaryDirectory() as folder:
        for layout in corpus():
            path = Path(folder) / layout.name
            path.write_bytes(layout.data)
            assert sender.send(path) == 0x0000, layout.name
