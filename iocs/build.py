"""Build the IOCs of a lab configuration: simulated worlds or hardware backends behind the PVGroups.

Instruments that share a simulated world (iocs/sim/<world>.py) are built together so they interact
(the X-ray box lights the EIGER; the supply feeds the BatMet the meter reads), on one world clock.
"""
from __future__ import annotations

from collections import defaultdict

from calbench.config import ConfigError, LabConfig
from calbench.instruments import INSTRUMENTS, load_object
from calbench.contracts.clock import WorldClock

# Worlds whose builder is not iocs/sim/<world>.py:build_world.
WORLD_BUILDERS = {"bench": "calbench.iocs.bench_world:build_world"}


def build_iocs(cfg: LabConfig, names: list[str] | None = None, *, force_sim: bool = False,
               time_scale: float | None = None, time_scales: dict[str, float] | None = None) -> list:
    """PVGroups for the named instruments (all configured ones by default).

    time_scale overrides the lab's world-clock acceleration for every world; time_scales sets it
    per world (e.g. {"qc6": 2000.0} so a 17-hour QC6 sequence runs in half a minute)."""
    names = list(cfg.instruments) if not names else names
    for name in names:
        if name not in cfg.instruments:
            known = ", ".join(cfg.instruments) or "none"
            raise ConfigError(f"instrument {name!r} is not in {cfg.source} (configured: {known}); "
                              f"add an [instruments.{name}] section")
    scale = cfg.time_scale if time_scale is None else time_scale
    by_world: dict[str, list[str]] = defaultdict(list)
    backends: dict[str, object] = {}
    clocks: dict[str, WorldClock] = {}
    for name in names:
        icfg = cfg.instruments[name]
        spec = INSTRUMENTS[name]
        if icfg.sim or force_sim:
            by_world[spec.world].append(name)
        else:
            backends[name] = load_object(spec.hardware)(icfg.settings)
            clocks[name] = WorldClock(1.0)
    for world, members in by_world.items():
        clock = WorldClock((time_scales or {}).get(world, scale))
        settings = {n: cfg.instruments[n].settings for n in cfg.instruments
                    if INSTRUMENTS[n].world == world}
        world_backends = load_object(WORLD_BUILDERS.get(
            world, f"calbench.iocs.sim.{world}:build_world"))(clock, cfg.seed, settings)
        for name in members:
            backends[name] = world_backends[name]
            clocks[name] = clock
    groups = []
    for name in names:
        ioc_class = load_object(INSTRUMENTS[name].ioc)
        extra = {}
        lease_s = cfg.instruments[name].settings.get("lease_s")
        if lease_s is not None:
            if not lease_s > 0:
                raise ConfigError(f"{cfg.source}: instruments.{name}.lease_s = {lease_s!r} must "
                                  "be > 0 (wall seconds without a heartbeat; default 30)")
            extra["lease_s"] = float(lease_s)
        ioc = ioc_class(prefix=cfg.prefix_of(name), backend=backends[name], clock=clocks[name],
                        **extra)
        ioc.access = cfg.instruments[name].access       # who may write (the lab file's writers)
        groups.append(ioc)
    return groups
