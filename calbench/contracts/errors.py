"""Exceptions shared by IOCs, simulated backends and hardware drivers (no caproto here)."""


class Refused(Exception):
    """The instrument refuses a request (out of range, interlock, wrong state). The message says why
    and what to do."""


class InstrumentFault(Exception):
    """The instrument (or the link to it) failed: no answer, garbage, a driver error."""
