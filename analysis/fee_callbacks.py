"""Document callbacks of the FEE cable calibration: fit the transit time of every channel in a sweep.

`TransitTimeFitter` consumes the documents of a calibration run live from the RunEngine (or replayed,
`refit_documents`) and fits each channel's sweep with `calbench.analysis.timewalk.fit_transit_time`;
`refit_run` does the same from a run read back from tiled. Live and offline fits are the same
computation on the same arrays, so a stored run re-analysed later gives the same transit time.

The sweep arrives as one event of stream "fee_sweep" whose array fields are named
`<device>_chNN_sweep_<direct|reflected>_<charge|time>` (one entry per pulse), beside
`<device>_seq_registers`, `<device>_seq_temperature` and `<device>_seq_start_time`.
"""
from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from event_model import DocumentRouter

from calbench.analysis.timewalk import (RG58_VELOCITY_M_PER_NS, TransitFitError, TransitTimeResult,
                                        fit_transit_time)

SWEEP_STREAM = "fee_sweep"
_FIELD = re.compile(r"_ch(?P<channel>\d{2})_sweep_(?P<kind>direct|reflected)_(?P<what>charge|time)$")


@dataclass(frozen=True)
class ChannelSweep:
    """The arrays of one channel from one sweep (per pulse; NaN where nothing fired)."""
    channel: int
    registers: np.ndarray
    direct_q_pC: np.ndarray
    direct_t_ns: np.ndarray
    reflected_q_pC: np.ndarray
    reflected_t_ns: np.ndarray
    temperature_C: float
    start_time: float                  # world time of the sweep's first pulse, epoch s


@dataclass(frozen=True)
class ChannelFit:
    """Outcome for one channel: a result, or the error that explains why there is none."""
    sweep: ChannelSweep
    result: TransitTimeResult | None
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.result is not None


def sweeps_from_event(data: dict) -> dict[int, ChannelSweep]:
    """Split the data of a fee_sweep event (field -> value) into per-channel sweeps."""
    per_channel: dict[int, dict[str, np.ndarray]] = {}
    registers = np.zeros(0)
    temperature, start = math.nan, math.nan
    for key, value in data.items():
        m = _FIELD.search(key)
        if m:
            per_channel.setdefault(int(m["channel"]), {})[f"{m['kind']}_{m['what']}"] = (
                np.asarray(value, dtype=float).ravel())
        elif key.endswith("_seq_registers"):
            registers = np.asarray(value).ravel()
        elif key.endswith("_seq_temperature"):
            temperature = float(np.asarray(value).ravel()[0])
        elif key.endswith("_seq_start_time"):
            start = float(np.asarray(value).ravel()[0])
    out = {}
    for channel, arrays in per_channel.items():
        missing = {"direct_charge", "direct_time", "reflected_charge", "reflected_time"} - set(arrays)
        if missing:
            raise TransitFitError(f"channel {channel}: the sweep event lacks {sorted(missing)}")
        out[channel] = ChannelSweep(channel, registers, arrays["direct_charge"],
                                    arrays["direct_time"],
                                    arrays["reflected_charge"], arrays["reflected_time"],
                                    temperature, start)
    return out


def fit_sweep(sweep: ChannelSweep, method: str = "binned", **fit_kwargs) -> ChannelFit:
    """Fit one channel's sweep; a TransitFitError becomes a ChannelFit with the error message."""
    amplitude = sweep.registers if sweep.registers.size == sweep.direct_q_pC.size else None
    try:
        result = fit_transit_time(sweep.direct_q_pC, sweep.direct_t_ns, sweep.reflected_q_pC,
                                  sweep.reflected_t_ns, method=method, amplitude=amplitude,
                                  label=f"channel {sweep.channel}", **fit_kwargs)
    except TransitFitError as exc:
        return ChannelFit(sweep, None, str(exc))
    return ChannelFit(sweep, result)


class TransitTimeFitter(DocumentRouter):
    """Fits every channel of each sweep event of a run; `fits[channel]` holds the latest outcome.

    method, velocity_m_per_ns and further keyword arguments go to fit_transit_time."""

    def __init__(self, method: str = "binned", *, velocity_m_per_ns: float = RG58_VELOCITY_M_PER_NS,
                 **fit_kwargs):
        super().__init__()
        self.method = method
        self.fit_kwargs = {"velocity_m_per_ns": velocity_m_per_ns, **fit_kwargs}
        self.fits: dict[int, ChannelFit] = {}
        self.run_uid: str | None = None
        self._sweep_descriptors: set[str] = set()

    def start(self, doc):
        self.fits = {}
        self.run_uid = doc["uid"]
        self._sweep_descriptors = set()

    def descriptor(self, doc):
        if doc.get("name") == SWEEP_STREAM:
            self._sweep_descriptors.add(doc["uid"])

    def event_page(self, doc):
        if doc["descriptor"] not in self._sweep_descriptors:
            return
        for i in range(len(doc["seq_num"])):
            row = {key: values[i] for key, values in doc["data"].items()}
            for channel, sweep in sweeps_from_event(row).items():
                self.fits[channel] = fit_sweep(sweep, self.method, **self.fit_kwargs)


def refit_run(run, method: str = "binned", **fit_kwargs) -> dict[int, ChannelFit]:
    """Fit a calibration run read back from tiled (`catalog[uid]`): its last fee_sweep event."""
    try:
        stream = run[SWEEP_STREAM]
    except KeyError:
        raise TransitFitError(f"run {run.start.get('uid', '?')} has no {SWEEP_STREAM!r} stream: it "
                              "is not an FEE calibration sweep") from None
    dataset = stream.read()
    data = {key: np.asarray(dataset[key].values)[-1] for key in dataset.data_vars}
    return {channel: fit_sweep(sweep, method, **fit_kwargs)
            for channel, sweep in sweeps_from_event(data).items()}


def refit_documents(documents: Iterable[tuple[str, dict]], method: str = "binned",
                    **fit_kwargs) -> dict[int, ChannelFit]:
    """Fit a stored calibration run again from its documents (e.g. tiled's `run.documents()`)."""
    fitter = TransitTimeFitter(method, **fit_kwargs)
    for name, doc in documents:
        fitter(name, doc)
    return fitter.fits
