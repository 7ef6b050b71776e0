"""Fixtures: the simulated lab's IOCs on loopback (random prefix), a real tiled server, a RunEngine
that persists to it. Channel Access stays on loopback."""
from __future__ import annotations

import os
import uuid
from dataclasses import replace

from calbench.iocs.server import free_port, loopback_ca_environment


# Before any CA client exists: search loopback only, never the LAN, on a port of this session's own
# (two test sessions on one machine would otherwise answer each other's searches).
os.environ.update(loopback_ca_environment())
_CA_PORT = str(free_port())
os.environ.update({"EPICS_CA_SERVER_PORT": _CA_PORT, "EPICS_CAS_SERVER_PORT": _CA_PORT})
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest  # noqa: E402

from calbench.config import InstrumentConfig, load_config  # noqa: E402
from calbench.config import DEFAULT_CONFIG  # noqa: E402

# World-clock acceleration per simulated world in the test session: QC6 holds of hours run in
# seconds; the X-ray world runs 5x so the tube warm-up and shutter motion do not dominate.
TEST_TIME_SCALES = {"qc6": 5000.0, "xray": 5.0, "bench": 50.0, "fee": 2000.0}


class Lab:
    """The running simulated lab: its configuration, IOCs and simulated backends."""

    def __init__(self, cfg, groups, server):
        self.cfg = cfg
        self.groups = {g.prefix: g for g in groups}
        self.server = server
        self._devices: dict = {}

    def prefix_of(self, name: str) -> str:
        return self.cfg.prefix_of(name)

    def ioc(self, name: str):
        return self.groups[self.prefix_of(name)]

    def backend(self, name: str):
        """The simulated backend: the simulator's hidden truth and fault injection, for tests."""
        return self.ioc(name).backend

    def device(self, name: str, *, fresh: bool = False):
        from calbench.lab import make_device
        if fresh or name not in self._devices:
            self._devices[name] = make_device(self.cfg, name, timeout=30.0)
        return self._devices[name]


def own_ca_port(monkeypatch) -> None:
    """IOCs started and CA clients made from here on use a port of their own: the session lab's
    server would otherwise answer their searches (and they its)."""
    port = str(free_port())
    monkeypatch.setenv("EPICS_CA_SERVER_PORT", port)
    monkeypatch.setenv("EPICS_CAS_SERVER_PORT", port)


def own_prefix(cfg, letter: str):
    """The lab configuration with a PV prefix of its own, for a test's own set of IOCs."""
    return replace(cfg, pv_prefix=f"{letter}{uuid.uuid4().hex[:6]}:")


@pytest.fixture(scope="session")
def lab_config(tmp_path_factory):
    home = tmp_path_factory.mktemp("labhome")
    os.environ["CALBENCH_HOME"] = str(home)       # instrument directories resolve under it
    cfg = load_config(DEFAULT_CONFIG)
    prefix = f"T{uuid.uuid4().hex[:6]}:"
    instruments = dict(cfg.instruments)
    if "xraybox" in instruments:
        x = instruments["xraybox"]
        instruments["xraybox"] = InstrumentConfig(x.name, x.backend, x.prefix,
                                                  {**x.settings, "warmup_s": 2.0})
    return replace(cfg, pv_prefix=prefix, instruments=instruments)


@pytest.fixture(scope="session")
def lab(lab_config):
    from calbench.iocs.build import build_iocs
    from calbench.iocs.server import IocThread
    groups = build_iocs(lab_config, time_scales=TEST_TIME_SCALES)
    server = IocThread(groups).start()
    yield Lab(lab_config, groups, server)
    server.stop()


@pytest.fixture(scope="session")
def tiled_server(lab_config, tmp_path_factory):
    from calbench.tiled_service import start_embedded
    directory = tmp_path_factory.mktemp("tiled")
    endpoint, proc = start_embedded(directory, [lab_config.data_dir], free_port())
    yield endpoint
    if proc is not None:
        proc.terminate()
        proc.wait(20)


@pytest.fixture
def catalog(tiled_server):
    """A fresh CatalogOfBlueskyRuns container on the session's tiled server."""
    from calbench.tiled_service import runs_catalog
    return runs_catalog(tiled_server, f"runs_{uuid.uuid4().hex[:8]}")


@pytest.fixture
def RE(catalog, tmp_path, lab_config):
    """A RunEngine whose documents are persisted to `catalog` (complete when RE(...) returns)."""
    from bluesky import RunEngine
    from calbench.persistence import TiledPersister
    engine = RunEngine({}, call_returns_result=False)
    engine.md.update({"operator": "pytest", "lab": lab_config.name})
    engine.persister = TiledPersister(catalog, journal_directory=tmp_path / "journal")
    engine.subscribe(engine.persister)
    engine.catalog = catalog
    yield engine
    if engine.state != "idle":
        engine.halt()
