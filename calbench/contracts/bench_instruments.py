"""The BatMet bench's commercial instruments as their manuals give them: the HP/Agilent 34401A
multimeter and the Agilent E3632A supply. The drivers (iocs/hw), the simulated bench (iocs/sim) and the
IOCs that publish their limits all read these numbers from here."""
from __future__ import annotations

# 34401A
CURRENT_RANGES_A = (0.01, 0.1, 1.0, 3.0)            # DC current ranges
VOLTAGE_RANGES_V = (0.1, 1.0, 10.0, 100.0, 1000.0)  # DC voltage ranges
NPLC_VALUES = (0.02, 0.2, 1.0, 10.0, 100.0)         # integration times, power-line cycles
FUNCTIONS = ("CURR:DC", "VOLT:DC")                   # the functions the bench uses
OVERLOAD = 9.9e37                                    # what the meter returns over range
DISPLAY_CHARS = 12                                   # front-panel text
MAX_SAMPLES = 100                                    # SAMP:COUN kept to what a reading waits for

# E3632A, 15 V / 7 A range
SUPPLY_MAX_V = 15.0
SUPPLY_MAX_A = 7.0
