"""What every layer agrees on, below all of them: instrument geometry, DAC names and limits, the
types backends exchange with their IOCs, the world clock. Imports nothing of calbench."""
