"""Hardware drivers of the bench instruments: pyvisa for the SCPI instruments (34401A multimeter,
lab supply), pyserial for the BatMet. They parse and validate every reply and raise `InstrumentFault`
(link failures, garbage) or `Refused` (requests the instrument cannot do) with the cause and the fix.

pyvisa and pyserial are imported only when a real port is opened, so the simulated bench (which runs
these same drivers over in-process fakes) needs neither.
"""
