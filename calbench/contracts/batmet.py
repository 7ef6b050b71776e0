"""BatMet current sink: its 12-bit sink DAC (`d <0..4095>` on the serial port)."""
from __future__ import annotations

DAC_MAX = 4095
