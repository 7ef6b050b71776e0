"""The EIGER calibration's scans simulated into HDF5 files and documents, without IOC or RunEngine.

Each scan is written as the detector IOC writes a run: one HDF5 file, dataset /entry/data/data
[points, rows, cols] with one chunk per frame, frame by frame (a 9M scan is never in memory), and
the run's documents name it (StreamResource, one StreamDatum per point, events with the scanned
setting and chip sums). The steps are calibrate_eiger's, in its order, each decided by the same
callback the plans subscribe (StepAnalysis on the documents), each next setting taken from the
step before: vrf scan, S-curve, trimbit scan, trimmed S-curve, the second target's threshold scan.
Used by tests/test_eiger_distributed.py (a 1M) and benchmarks/bench_eiger_9m.py (a 9M).
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
from event_model import compose_run

from calbench.analysis.eiger_calibration import GLOBAL_TARGETS, line_energy
from calbench.analysis.eiger_callbacks import StepAnalysis
from calbench.contracts.clock import WorldClock
from calbench.iocs.sim.eiger import EigerSim

# photons / pixel / s at 40 kV 40 mA (as benchmarks/bench_eiger_calibration.py)
FLUX = {"Cu": 1.0e4, "Ge": 0.62e4}
IMAGE, X_KEY, SUMS = "eiger_image", "eiger_x", "eiger_chip_sums"


@dataclass
class Ranges:
    vrf: tuple[int, int, int] = (2500, 3700, 30)
    scurve: tuple[int, int, int] = (0, 2001, 40)
    trimbit_step: int = 2


@dataclass
class StepFigures:
    step: str
    target: str
    points: int
    acquire_s: float          # simulating the frames and writing the file
    analyse_s: float          # the callback's analysis at stop


@dataclass
class Procedure:
    results: dict = field(default_factory=dict)     # mode -> step -> analysis result
    figures: list[StepFigures] = field(default_factory=list)


def scan_documents(sim: EigerSim, path: Path, *, step: str, x, setter: Callable[[int], None],
                   target: str, exptime_s: float) -> list[tuple[str, dict]]:
    """Acquire one scan into ``path`` and return its run's documents."""
    g = sim.geometry
    energy, flux = line_energy(target), FLUX[target]
    bundle = compose_run(metadata={
        "step": step, "geometry": g.name, "target": target, "exptime_s": exptime_s,
        "x_key": X_KEY, "image_key": IMAGE, "chip_sums_key": SUMS, "det_id": sim.det_id})
    dtype = np.dtype(f"u{sim.dr // 8}") if sim.dr > 8 else np.dtype(np.uint8)
    desc = bundle.compose_descriptor(name="primary", data_keys={
        X_KEY: {"source": "sim", "dtype": "number", "shape": []},
        SUMS: {"source": "sim", "dtype": "array", "shape": [g.n_chips]},
        IMAGE: {"source": "sim", "dtype": "array", "shape": list(g.shape), "external": "STREAM:",
                "dtype_numpy": dtype.str}})
    res = bundle.compose_stream_resource(
        mimetype="application/x-hdf5", uri=path.as_uri().replace("file:///", "file://localhost/"),
        data_key=IMAGE, parameters={"dataset": "/entry/data/data"})
    docs = [("start", bundle.start_doc), ("descriptor", desc.descriptor_doc),
            ("stream_resource", res.stream_resource_doc)]
    with h5py.File(path, "w") as f:
        data = f.create_dataset("/entry/data/data", shape=(len(x),) + g.shape,
                                chunks=(1,) + g.shape, dtype=dtype)
        for i, v in enumerate(x):
            setter(int(v))
            frame = sim._count(energy, flux, exptime_s)
            data[i] = frame
            datum = res.compose_stream_datum(indices={"start": i, "stop": i + 1})
            datum["descriptor"] = desc.descriptor_doc["uid"]
            datum["seq_nums"] = {"start": i + 1, "stop": i + 2}
            docs += [("stream_datum", datum), ("event", desc.compose_event(
                data={X_KEY: float(v), SUMS: g.chip_sums(frame)},
                timestamps={X_KEY: 0.0, SUMS: 0.0}, seq_num=i + 1))]
    docs.append(("stop", bundle.compose_stop(exit_status="success")))
    return docs


def run_procedure(geometry: str, directory: Path, *, lazy: tuple[bool | None, ...] = (None,),
                  target: str = "Cu", ranges: Ranges = Ranges(), seed: int = 20261122,
                  keep_files: bool = True) -> Procedure:
    """calibrate_eiger's scans and decisions on a simulated ``geometry``. Every scan is analysed
    once per mode of ``lazy`` (StepAnalysis's: frames read whole, or left in the file); the first
    mode's decisions set the next step. With keep_files False each scan's file is removed once
    analysed (a 9M scan is ~2 GB)."""
    sim = EigerSim(WorldClock(1.0), geometry=geometry, seed=seed)
    sim.set_dynamic_range(32)
    sim.set_dac("vtrim", 2500)
    sim.set_trimval(32)
    sim.set_vthreshold(1200)
    out = Procedure(results={mode: {} for mode in lazy})

    def step(name, key, x, setter, tgt, exptime_s, untrimmed=None):
        path = directory / f"{name}_{tgt}_{len(out.figures)}.h5"
        t0 = time.perf_counter()
        docs = scan_documents(sim, path, step=name, x=x, setter=setter, target=tgt,
                              exptime_s=exptime_s)
        t1 = time.perf_counter()
        for mode in lazy:
            # the trimbit scan gets what the plans keep of the untrimmed S-curve
            analysis = StepAnalysis(untrimmed=out.results[mode].get("untrimmed_kept", untrimmed),
                                    lazy=mode)
            for doc_name, doc in docs:
                analysis(doc_name, doc)
            if analysis.result is None:
                raise RuntimeError(f"{name} on {tgt}: {analysis.error}")
            out.results[mode][key] = analysis.result
            if mode is lazy[0]:
                t2 = time.perf_counter()
        out.figures.append(StepFigures(name, tgt, len(x), t1 - t0, t2 - t1))
        if not keep_files:
            path.unlink()
        return out.results[lazy[0]][key]

    vrf = step("vrf_scan", "vrf_scan", np.arange(*ranges.vrf),
               lambda v: sim.set_dac("vrpreamp", v), target, 0.1)
    for hm, v in enumerate(vrf.vrf):
        sim.set_dac("vrpreamp", int(v), hm)
    xs = np.arange(*ranges.scurve)
    untrimmed, _ = step("scurve", "untrimmed_scan", xs, sim.set_vthreshold, target,
                        vrf.exptime_s)
    for mode in lazy:
        r = out.results[mode]
        r["untrimmed"] = r["untrimmed_scan"][0]
        r["untrimmed_kept"] = r["untrimmed"].kept(trimbit_targets=True)
    sim.set_vcmp(untrimmed.vcmp)
    for hm, v in enumerate(untrimmed.vcp):
        sim.set_dac("vcp", int(v), hm)
    trimbits = step("trimbit_scan", "trimbit_scan", np.arange(0, 64, ranges.trimbit_step),
                    sim.set_trimval, target, vrf.exptime_s)
    sim.set_trimbits(trimbits.trimbits)
    step("scurve", "trimmed_scan", xs, sim.set_vthreshold, target, vrf.exptime_s)
    step("line_scan", "second_line", xs, sim.set_vthreshold, GLOBAL_TARGETS[target][0], 0.1)
    for mode in lazy:
        r = out.results[mode]
        r["trimmed"], first_line = r["trimmed_scan"]
        r["lines"] = (first_line, r["second_line"])
    return out
