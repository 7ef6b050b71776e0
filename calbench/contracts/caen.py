"""CAEN SY5527 crate: what a backend (simulated or CAEN HV Wrapper) reports of the boards it holds."""
from __future__ import annotations

from dataclasses import dataclass

# The GEM lab's board and the ranges its channel parameters take (the IOC publishes them as limits)
BOARD_MODEL = "A1515TG"
BOARD_DESCRIPTION = "14 ch floating triple-GEM 1.2 kV 20 uA"
BOARD_CHANNELS = 14
HW_VMAX_V = 1200.0        # board hardware limit per channel
HW_IMAX_UA = 20.0
RAMP_LIMITS_V_PER_S = (1.0, 500.0)
TRIP_LIMITS_S = (0.0, 1000.0)


@dataclass(frozen=True)
class BoardInfo:
    """One entry of the crate map."""
    slot: int
    model: str
    description: str
    serial_number: int
    n_channels: int
    firmware: str
