"""Kill drill: a procedure's RunEngine killed (kill -9) in its hazardous phase, and the time until
the instrument's IOC has made it safe by itself (the procedure lease, iocs/lease.py).

    python -m calbench.procedures.kill_drill [qc6 batmet xray] [--lease-s 3]

For each procedure the drill serves the instrument's simulated IOCs in this process (a prefix of
their own, the given lease), runs the procedure's plan in a child process as a lab session would,
watches the simulator's truth until the hazardous phase (QC6 long stability: foils at 580 V;
BatMet calibration: sink current with the supply on; X-ray exposure: XRF shutter open with HV
on), kills the child with SIGKILL and measures, on the wall clock, the time until the lease
lapsed and until the instrument is safe (QC6: every channel off and below 2 V; BatMet: DAC 0 and
supply off; X-ray: shutters closed and HV off). tests/test_procedure_lease.py runs the same drills.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, replace

from calbench.config import DEFAULT_CONFIG, InstrumentConfig, LabConfig, load_config

PROCEDURES = ("qc6", "batmet", "xray")
# the instruments each drill serves, and the world-clock acceleration it runs them at
_INSTRUMENTS = {"qc6": ["caen"], "batmet": ["dmm", "psu", "batmet"], "xray": ["xraybox"]}
_WORLDS = {"qc6": {"qc6": 1000.0}, "batmet": {"bench": 50.0}, "xray": {"xray": 20.0}}
OFF_V = 2.0
HOLD_V = 500.0                 # a foil above this with the drift off: the long stability hold


@dataclass
class DrillResult:
    procedure: str
    lease_s: float
    lapse_s: float             # wall s from the kill to the IOC's lease lapse
    safe_s: float              # wall s from the kill to a safe instrument (simulator's truth)
    message: str               # the IOC's StatusMessage_RBV afterwards

    def row(self) -> str:
        return (f"{self.procedure:<8} lease {self.lease_s:5.1f} s   "
                f"kill -> lapse {self.lapse_s:6.2f} s   kill -> safe {self.safe_s:6.2f} s")


class DrillFailed(RuntimeError):
    """The drill could not reach its hazardous phase, or the instrument did not become safe."""


def _drill_config(cfg: LabConfig, lease_s: float) -> LabConfig:
    instruments = {}
    for name, icfg in cfg.instruments.items():
        settings = dict(icfg.settings)
        if "lease_s" in settings:
            settings["lease_s"] = float(lease_s)
        if name == "xraybox":
            settings["warmup_s"] = 2.0          # a short warm-up: the drill is about the exposure
        instruments[name] = InstrumentConfig(icfg.name, icfg.backend, icfg.prefix, settings)
    return replace(cfg, pv_prefix=f"KD{uuid.uuid4().hex[:6]}:", instruments=instruments)


def _conditions(procedure: str, groups: dict):
    """(hazardous(), safe()) on the simulator's truth."""
    if procedure == "qc6":
        sim = groups["caen"].backend
        foils, drift = (5, 3, 1), 6            # layer 1: G1T, G2T, G3T; drift on channel 6

        def hazardous():
            v, on = sim.voltages(sim.slot), sim.powered(sim.slot)
            return all(on[c] and v[c] > HOLD_V for c in foils) and not on[drift]

        def safe():
            v, on = sim.voltages(sim.slot), sim.powered(sim.slot)
            return not any(on) and max(v) < OFF_V
    elif procedure == "batmet":
        world = groups["batmet"].backend.sim.world

        def hazardous():
            return world.dac > 0 and world.supply.output_on

        def safe():
            return world.dac == 0 and not world.supply.output_on
    elif procedure == "xray":
        box = groups["xraybox"].backend

        def hazardous():
            s = box.read()
            return s.hv_on and s.shutters["XRF"]

        def safe():
            return box.read().safe
    else:
        raise ValueError(f"no drill for {procedure!r}; drills: {', '.join(PROCEDURES)}")
    return hazardous, safe


def _wait(condition, cap_s: float, what: str, child=None) -> float:
    deadline = time.monotonic() + cap_s
    while not condition():
        if child is not None and child.poll() is not None:
            out = child.stdout.read() if child.stdout else ""
            raise DrillFailed(f"the procedure ended before {what} "
                              f"(exit {child.returncode}):\n{out}")
        if time.monotonic() > deadline:
            raise DrillFailed(f"no {what} within {cap_s:g} s")
        time.sleep(0.01)
    return time.monotonic()


def drill(procedure: str, *, lease_s: float = 3.0, cfg: LabConfig | None = None,
          cap_s: float = 180.0) -> DrillResult:
    """Run one kill drill (see the module docstring); raises DrillFailed if it cannot."""
    from calbench.iocs.build import build_iocs
    from calbench.iocs.server import IocThread, free_port

    cfg = _drill_config(cfg or load_config(DEFAULT_CONFIG), lease_s)
    names = _INSTRUMENTS[procedure]
    built = build_iocs(cfg, names, force_sim=True, time_scales=_WORLDS[procedure])
    groups = dict(zip(names, built))
    hazardous, safe = _conditions(procedure, groups)
    leased = [g for g in built if hasattr(g, "lease")]
    # a CA port of its own: another server on the same port would take the child's searches
    port = free_port(socket.SOCK_DGRAM)
    with IocThread(built, port=port), tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "CALBENCH_PV_PREFIX": cfg.pv_prefix, "CALBENCH_HOME": tmp,
               "EPICS_CA_SERVER_PORT": str(port), "EPICS_CAS_SERVER_PORT": str(port)}
        child = subprocess.Popen(
            [sys.executable, "-m", "calbench.procedures.kill_drill", "--child", procedure, str(cfg.source)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            _wait(hazardous, cap_s, f"hazardous phase of {procedure}", child)
            child.send_signal(signal.SIGKILL)
            t_kill = time.monotonic()
            child.wait(cap_s)
            t_lapse = _wait(lambda: any(g.procedure_lease.state == "Lapsed" for g in leased),
                            cap_s, "lease lapse")
            t_safe = _wait(safe, cap_s, "safe instrument")
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
        lapsed = [g for g in leased if g.procedure_lease.state == "Lapsed"]
        # the report follows the making safe: wait for it
        _wait(lambda: all("lapsed" in str(g.status_message.value) for g in lapsed), cap_s,
              "lapse report")
        messages = [str(g.status_message.value) for g in lapsed]
        return DrillResult(procedure, lease_s, t_lapse - t_kill, t_safe - t_kill,
                           " | ".join(m for m in messages if m))


def _child(procedure: str, config: str) -> None:
    """The lab session under test: run the procedure's plan until killed."""
    import bluesky.plan_stubs as bps
    from bluesky import RunEngine

    from calbench.lab import make_device
    from calbench.session import configure_ca

    cfg = load_config(config)
    configure_ca(cfg)
    RE = RunEngine({})
    if procedure == "qc6":
        from calbench.plans.qc6 import long_stability
        layer = make_device(cfg, "caen", timeout=60).layer(timeout=60)
        RE(long_stability(layer, vstart_V=4000.0, vmax_V=4200.0, hold_h=15.0, live_plot=False,
                          results_dir=cfg.results_dir))
    elif procedure == "batmet":
        from calbench.plans.batmet import collect_sink_calibration
        dmm, psu, sink = (make_device(cfg, n, timeout=60) for n in ("dmm", "psu", "batmet"))
        RE(collect_sink_calibration(dmm, sink, psu))
    elif procedure == "xray":
        from calbench.plans.xray import tube_on, xrf_exposure
        box = make_device(cfg, "xraybox", timeout=60)
        RE(tube_on(box, 40.0, 40.0))
        RE(xrf_exposure(box, "Cu", bps.sleep(3600)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("procedures", nargs="*", default=list(PROCEDURES))
    parser.add_argument("--lease-s", type=float, default=3.0, help="the drill's lease (wall s)")
    parser.add_argument("--child", nargs=2, metavar=("PROCEDURE", "CONFIG"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(*args.child)
        return 0
    from calbench.session import configure_ca
    configure_ca(load_config(DEFAULT_CONFIG))
    for procedure in args.procedures:
        print(drill(procedure, lease_s=args.lease_s).row(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
