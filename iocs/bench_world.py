"""The bench world as the IOCs serve it: the hardware drivers (iocs/hw/) talking to the simulated
instruments' text interfaces (iocs/sim/bench.py). It lives beside both, since the simulators and the
drivers never import each other: the drivers are tested against the simulated wire exactly as they
talk to the lab's instruments."""
from __future__ import annotations

from calbench.contracts.clock import WorldClock
from calbench.iocs.hw.agilent34401a import Agilent34401A
from calbench.iocs.hw.batmet_serial import BatmetSerial
from calbench.iocs.hw.scpi_psu import ScpiPsu
from calbench.iocs.sim.bench import build_bench


def build_world(clock: WorldClock, seed: int, settings: dict[str, dict]) -> dict[str, object]:
    """The bench world's backends by instrument name: the hardware drivers (iocs/hw/) talking to
    the simulated instruments' text interfaces. Each backend's `sim` attribute is the simulated
    link (fault injection) and `sim.world` the circuit (hidden truth)."""
    bench = build_bench(clock, seed)
    for name, link in (("dmm", bench.meter), ("psu", bench.supply), ("batmet", bench.batmet)):
        link.timeout_s = float(settings.get(name, {}).get("timeout_s", link.timeout_s))
    dmm = Agilent34401A(lambda: bench.meter, port="sim://bench/dmm",
                        settings=settings.get("dmm", {}))
    psu = ScpiPsu(lambda: bench.supply, port="sim://bench/psu", settings=settings.get("psu", {}))
    batmet = BatmetSerial(lambda: bench.batmet, port="sim://bench/batmet")
    dmm.sim, psu.sim, batmet.sim = bench.meter, bench.supply, bench.batmet
    return {"dmm": dmm, "psu": psu, "batmet": batmet}
