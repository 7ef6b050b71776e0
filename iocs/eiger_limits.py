"""Limits both EIGER backends (simulated and slsdet) enforce before touching a DAC."""
from __future__ import annotations

from calbench.contracts.eiger import DAC_MAX, DAC_MIN
from calbench.iocs.errors import Refused


def check_dac(name: str, value) -> int:
    """The DAC value as an int, or Refused naming the range."""
    v = float(value)
    if not v.is_integer() or not DAC_MIN <= v <= DAC_MAX:
        raise Refused(f"DAC {name} = {value} outside {DAC_MIN}..{DAC_MAX} (12-bit DAC units); "
                      "use an integer in range")
    return int(v)
