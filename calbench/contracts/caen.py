"""CAEN SY5527 crate: what a backend (simulated or CAEN HV Wrapper) reports of the boards it holds."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BoardInfo:
    """One entry of the crate map."""
    slot: int
    model: str
    description: str
    serial_number: int
    n_channels: int
    firmware: str
