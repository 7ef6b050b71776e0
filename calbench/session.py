"""Building an interactive (or queue-server) session: RunEngine, persistence, callbacks, devices.

The profile's startup files call these functions and hold no logic themselves.
"""
from __future__ import annotations

import logging
import os

from calbench.config import LabConfig
from calbench.iocs.server import loopback_ca_environment

log = logging.getLogger(__name__)

# Names the lab uses at the prompt: RE(vrf_scan(det, box)).
PROFILE_NAMES = {"xraybox": "box", "eiger": "det", "caen": "crate", "dmm": "dmm", "psu": "psu",
                 "batmet": "batmet", "fee": "fee"}
# ophyd labels, for %wa and %ct (which counts the 'detectors' by default).
PROFILE_LABELS = {"xraybox": {"sources"}, "eiger": {"detectors"}, "caen": {"hv"},
                  "dmm": {"detectors"}, "psu": {"supplies"}, "batmet": {"detectors"},
                  "fee": {"detectors"}}
# The lab's state recorded in every run's baseline stream (read at open and close), per prompt name.
BASELINE = {"box": ("hv", "voltage", "current", "target", "xrf_shutter", "direct_shutter"),
            "det": ("temperature",), "fee": ("temperature",), "psu": ("output", "voltage"),
            "layer": None}      # None: the device's own read (every electrode's VMon, IMon, Status)


def configure_ca(cfg: LabConfig) -> None:
    """Search the lab's IOC interfaces only (set before the first CA client is created)."""
    for key, value in loopback_ca_environment(cfg.interfaces).items():
        os.environ.setdefault(key, value)


def make_run_engine(cfg: LabConfig, *, interactive: bool = True):
    """RunEngine with metadata shared by the lab home's sessions, tiled persistence through the
    write-ahead journal (journal only while tiled is unreachable), progress bars and the
    BestEffortCallback. Journaled runs of ended sessions go to tiled first. Returns (RE, bec,
    catalog or None)."""
    from bluesky import RunEngine
    from bluesky.utils import ProgressBarManager

    from calbench.config import private_dir
    from calbench.live_feedback import SessionBestEffortCallback
    from calbench.persistence import TiledPersister
    from calbench.plans.toolkit import set_results_dir
    from calbench.run_metadata import lab_metadata
    from calbench.tiled_service import TiledUnavailable, connect_catalog

    private_dir(cfg.home)
    set_results_dir(cfg.results_dir)        # where procedures write their files by default
    md = lab_metadata(cfg.home)
    RE = RunEngine(md, scan_id_source=md.next_scan_id)
    bootstrap_metadata(RE.md, cfg, interactive=interactive)
    RE.md["lab"] = cfg.name
    RE.md["lab_config"] = cfg.as_metadata()
    if interactive:
        RE.waiting_hook = ProgressBarManager()
    bec = SessionBestEffortCallback(plots_dir=cfg.results_dir / "plots")
    bec.disable_baseline()       # stored in every run; a table of it twice per run is noise
    if not interactive:
        bec.disable_plots()
    RE.subscribe(bec)
    catalog = None
    try:
        catalog = connect_catalog(cfg)
    except (TiledUnavailable, OSError) as exc:
        print(f"WARNING: runs are NOT going to tiled ({exc}); they are kept in the journal "
              f"{cfg.journal_dir}. Start tiled (`calbench tiled start`), then `calbench tiled "
              "replay` or restart the session stores them.")
    if catalog is not None:
        replay_journal(catalog, cfg)
        md.raise_scan_id_floor(last_scan_id(catalog))
    RE.persister = TiledPersister(catalog, journal_directory=cfg.journal_dir,
                                  stop_timeout_s=cfg.tiled_stop_timeout_s)
    RE.subscribe(RE.persister)
    return RE, bec, catalog


def bootstrap_metadata(md, cfg: LabConfig, *, interactive: bool) -> None:
    """operator and proposal in RE.md: kept from the last session, else the lab file's, else asked
    (at an interactive terminal only), else the login name for the operator."""
    import sys

    for key, default in (("operator", cfg.operator), ("proposal", cfg.proposal)):
        if md.get(key) not in (None, "", "unknown"):
            continue
        value = default
        if not value and interactive and sys.stdin.isatty():
            value = input(f"{key} (stored in every run; lab.{key} in the lab file sets a default): ")
        if not value and key == "operator":
            value = os.environ.get("USER", "unknown")
        md[key] = value.strip()


def replay_journal(catalog, cfg: LabConfig) -> list:
    """Store the runs ended sessions left in the journal; one line per run."""
    from calbench.persistence import replay

    results = replay(catalog, cfg.journal_dir)
    for r in results:
        print(f"journal -> tiled: run {r.uid} ({r.events} events): {r.outcome}")
    return results


def last_scan_id(catalog) -> int:
    """The largest scan id in the catalog (0 if none or unreadable)."""
    try:
        for run in catalog.sort(("start.scan_id", -1)).values().head(1):
            return int(run.metadata["start"].get("scan_id", 0))
    except Exception as exc:     # a floor only: the lab home's counter still holds
        log.warning("could not read the catalog's last scan id: %s", exc)
    return 0


def make_lab_devices(cfg: LabConfig, *, timeout: float = 3.0) -> dict:
    """Devices of every configured instrument under their prompt names (box, det, ...). An IOC that
    does not answer is reported, and its device kept (it connects when the IOC comes up)."""
    from calbench.lab import make_device

    devices = {}
    for name in cfg.instruments:
        try:
            device = make_device(cfg, name, connect=False)
        except ImportError as exc:
            print(f"WARNING: no device for {name}: {exc}")
            continue
        device._ophyd_labels_ = set(PROFILE_LABELS.get(name, ()))
        try:
            device.ensure_connected(timeout)
        except ConnectionError as exc:
            print(f"WARNING: {exc}")
        devices[PROFILE_NAMES.get(name, name)] = device
    if "crate" in devices:
        layer = devices["layer"] = devices["crate"].layer(connect=False)   # the configured GEM layer
        layer._ophyd_labels_ = {"hv"}
        if devices["crate"].connected:
            try:
                layer.ensure_connected(timeout)
            except ConnectionError as exc:
                print(f"WARNING: {exc}")
    return devices


def lab_baseline(devices: dict) -> list:
    """What `sd.baseline` records of the lab (tube kV/mA, shutters, temperatures, the GEM layer's
    channels), from the devices whose IOCs answer: a missing one would fail every run."""
    baseline = []
    for name, attrs in BASELINE.items():
        device = devices.get(name)
        if device is None or not device.connected:
            continue
        baseline.extend([device] if attrs is None else [getattr(device, a) for a in attrs])
    return baseline


def configure_ipython(ip, cfg: LabConfig, RE) -> None:
    """bluesky's magics (%mov, %movr, %ct, %wa), the lab's errors as one line, the session's log
    and IPython's input log in the lab home."""
    from bluesky.magics import BlueskyMagics

    from calbench.session_console import configure_logging, install_error_display

    BlueskyMagics.RE = RE
    ip.register_magics(BlueskyMagics)
    log_path = configure_logging(cfg.home)
    install_error_display(ip, log_path)
    history = log_path.with_name(log_path.name.replace("session-", "ipython-"))
    ip.run_line_magic("logstart", f"-o -t -q {history} append")
