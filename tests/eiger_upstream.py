"""slsDetectorPackage's threshold interpolation built from C for the tests to compare against.

``Module::linearInterpolation`` (slsDetectorSoftware/src/Module.h) is four lines of double
arithmetic and C ``round``; it is written out here as a plain C function and compiled without
fused multiply-add (as the x86-64 build of slsDetectorPackage), so that the tests compare our numpy
with what a C compiler makes of the same operations."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

C_SOURCE = r"""
#include <math.h>
#include <stdio.h>
static int lin(int x, int x1, int x2, int y1, int y2) {
    double k = (double)(y2 - y1) / (x2 - x1);
    double m = y1 - k * x1;
    int y = round(k * x + m);
    return y;
}
int main(void) {
    int x, x1, x2, y1, y2;
    while (scanf("%d %d %d %d %d", &x, &x1, &x2, &y1, &y2) == 5)
        printf("%d\n", lin(x, x1, x2, y1, y2));
    return 0;
}
"""


def build(directory: Path) -> Path:
    """Compile the reference into ``directory``; skips the test when no C compiler is found."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler (cc/gcc) on PATH to build the reference; install gcc")
    src = directory / "lin.c"
    src.write_text(C_SOURCE)
    exe = directory / "lin"
    subprocess.run([cc, "-O2", "-ffp-contract=off", str(src), "-o", str(exe), "-lm"], check=True)
    return exe


def interpolate(exe: Path, x: int, x1: int, x2: int, y1, y2) -> np.ndarray:
    """The compiled reference applied elementwise to integer arrays y1, y2."""
    a, b = np.broadcast_arrays(np.asarray(y1, np.int64), np.asarray(y2, np.int64))
    lines = "".join(f"{x} {x1} {x2} {p} {q}\n" for p, q in zip(a.ravel(), b.ravel()))
    out = subprocess.run([str(exe)], input=lines, capture_output=True, text=True,
                         check=True).stdout.split()
    return np.array(out, dtype=np.int64).reshape(a.shape)
