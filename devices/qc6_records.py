"""Soft devices whose readings are a QC6 plan's own data (no PVs): a trip, the plan's state at a
measurement, a Megger reading. Plans fill them and read them into events like any device."""
from __future__ import annotations

from ophyd import Component as Cpt
from ophyd import Device, Signal


class TripRecord(Device):
    """One trip: an event in the "trips" stream (keys trip_channel, trip_voltage, ...)."""
    channel = Cpt(Signal, value=0, kind="hinted")
    electrode = Cpt(Signal, value="", kind="normal")
    voltage = Cpt(Signal, value=0.0, kind="hinted")      # last VMon before the trip (V)
    v0set = Cpt(Signal, value=0.0, kind="normal")        # setpoint then (V)
    time = Cpt(Signal, value=0.0, kind="normal")         # world epoch s the crate showed the trip
    incident = Cpt(Signal, value=0, kind="normal")       # trips seen in one poll share a number


class Qc6Record(Device):
    """Plan state recorded with measurements (keys qc6_world_time, qc6_elapsed_s, ...)."""
    world_time = Cpt(Signal, value=0.0, kind="normal")
    elapsed_s = Cpt(Signal, value=0.0, kind="hinted")
    trips = Cpt(Signal, value=0, kind="hinted")
    setpoint = Cpt(Signal, value=0.0, kind="hinted")     # divider (IV) or foil (stress) voltage


class MeggerRecord(Device):
    """The operator's Megger reading of one GEM foil (measured with the Megger, not the crate)."""
    gem = Cpt(Signal, value=0, kind="hinted")
    impedance_GOhm = Cpt(Signal, value=0.0, kind="hinted")
    sparks = Cpt(Signal, value=0, kind="hinted")


def fill(record: Device, **values) -> None:
    """Set a record's soft signals: bookkeeping, not an instrument action."""
    for key, value in values.items():
        getattr(record, key).put(value)
