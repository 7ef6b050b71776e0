"""PSI EIGER geometry: half modules, chips and their vcmp DACs in the assembled image.

A chip has 256 x 256 pixels; a half module (one BEB, one slsdet "module") is 4 chips side by side,
256 x 1024; a module (500k) is two half modules, 512 x 1024. In the assembled image of a module
(sls_detector_tools ``mask.py``, ``io.load_frame``) the *top* half module (even index, e.g. beb058)
is rows 256:512 and the *bottom* one (odd index, beb059) rows 0:256; chips are numbered top half
module first, then bottom, each left to right (columns 0, 256, 512, 768).

Chip -> vcmp DAC (slsdet ``EigerVcmp``, sls_detector_tools calibration): the top half module's
chips are vcmp_ll, vcmp_lr, vcmp_rl, vcmp_rr; the bottom half module is mounted rotated, so its
chips left to right are vcmp_rr, vcmp_rl, vcmp_lr, vcmp_ll. ``vcmp`` lists (the per-chip vcmp
waveform, slsdet ``d.vcmp[:]``) are in chip order.

Layouts (modules without the inter-module gaps): 250k one half module (256 x 1024); 500k one
module; 1M, 1.5M (OMNY) and 2M modules stacked vertically (module m at rows 512m..512m+511); 9M
(cSAXS) 18 modules in 6 rows x 3 columns (3072 x 3072), module m at row block m // 3, column
block m % 3.

Pure numpy.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
from numpy.typing import NDArray

__all__ = ["CHIP_SIZE", "HALF_MODULE_ROWS", "HALF_MODULE_COLS", "VCMP_NAMES", "GEOMETRIES",
           "DYNAMIC_RANGES", "EigerGeometry", "geometry", "frame_dtype"]

CHIP_SIZE = 256
HALF_MODULE_ROWS, HALF_MODULE_COLS = 256, 1024
VCMP_NAMES = ("vcmp_ll", "vcmp_lr", "vcmp_rl", "vcmp_rr")

# name -> (module rows, module columns) or None for the single half module of a 250k
_LAYOUTS: dict[str, tuple[int, int] | None] = {
    "250k": None, "500k": (1, 1), "1M": (2, 1), "1.5M": (3, 1), "2M": (4, 1), "9M": (6, 3),
}
GEOMETRIES: tuple[str, ...] = tuple(_LAYOUTS)

# Counter depths (bits) and the dtype of a frame at each (4-bit data are unpacked to one pixel per
# byte, as slsReceiver's consumers do).
DYNAMIC_RANGES: tuple[int, ...] = (4, 8, 12, 16, 32)
_FRAME_DTYPES = {4: np.uint8, 8: np.uint8, 12: np.uint16, 16: np.uint16, 32: np.uint32}


def frame_dtype(dr: int) -> np.dtype:
    """numpy dtype of a frame at dynamic range ``dr`` bits."""
    try:
        return np.dtype(_FRAME_DTYPES[int(dr)])
    except KeyError:
        raise ValueError(f"dynamic range {dr} bit: EIGER counts with "
                         f"{', '.join(map(str, DYNAMIC_RANGES))} bit") from None


@dataclass(frozen=True)
class EigerGeometry:
    """Pixel layout of an EIGER detector (see the module docstring for the conventions)."""
    name: str
    module_rows: int
    module_cols: int
    single_half_module: bool = False

    @property
    def rows(self) -> int:
        return HALF_MODULE_ROWS if self.single_half_module else 512 * self.module_rows

    @property
    def cols(self) -> int:
        return HALF_MODULE_COLS * self.module_cols

    @property
    def shape(self) -> tuple[int, int]:
        """Image shape (rows, columns) in pixels."""
        return self.rows, self.cols

    @property
    def n_pixels(self) -> int:
        return self.rows * self.cols

    @property
    def n_half_modules(self) -> int:
        return 1 if self.single_half_module else 2 * self.module_rows * self.module_cols

    @property
    def n_chips(self) -> int:
        return 4 * self.n_half_modules

    def half_module_origin(self, hm: int) -> tuple[int, int]:
        """(row, column) of the lower-left pixel of half module ``hm`` in the image."""
        self._check_hm(hm)
        if self.single_half_module:
            return 0, 0
        module, bottom = divmod(hm, 2)
        mrow, mcol = divmod(module, self.module_cols)
        return 512 * mrow + (0 if bottom else 256), HALF_MODULE_COLS * mcol

    def half_module_slice(self, hm: int) -> tuple[slice, slice]:
        """Image slice (rows, columns) of half module ``hm`` (the trim file's 256 x 1024 block)."""
        r, c = self.half_module_origin(hm)
        return slice(r, r + HALF_MODULE_ROWS), slice(c, c + HALF_MODULE_COLS)

    def chip_slice(self, chip: int) -> tuple[slice, slice]:
        """Image slice of chip ``chip`` (0 .. n_chips-1)."""
        if not 0 <= chip < self.n_chips:
            raise IndexError(f"chip {chip} outside 0..{self.n_chips - 1} for a {self.name}")
        hm, k = divmod(chip, 4)
        r, c = self.half_module_origin(hm)
        return slice(r, r + CHIP_SIZE), slice(c + CHIP_SIZE * k, c + CHIP_SIZE * (k + 1))

    def chip_vcmp(self, chip: int) -> tuple[int, str]:
        """(half module, vcmp DAC name) that sets chip ``chip``'s threshold."""
        hm, k = divmod(chip, 4)
        return hm, VCMP_NAMES[k] if hm % 2 == 0 else VCMP_NAMES[3 - k]

    @cached_property
    def chip_map(self) -> NDArray[np.int16]:
        """Image-shaped array of chip indices."""
        out = np.empty(self.shape, dtype=np.int16)
        for chip in range(self.n_chips):
            out[self.chip_slice(chip)] = chip
        return out

    @cached_property
    def _chip_grid(self) -> NDArray[np.intp]:
        """Chip index of each 256 x 256 block (block rows x block columns)."""
        return self.chip_map[::CHIP_SIZE, ::CHIP_SIZE].astype(np.intp)

    def chip_sums(self, frame: NDArray) -> NDArray[np.float64]:
        """Sum of a frame (or a stack [n, rows, cols], summed over n) per chip, in chip order."""
        frame = np.asarray(frame)
        if frame.shape[-2:] != self.shape:
            raise ValueError(f"frame shape {frame.shape} does not match a {self.name} {self.shape}")
        if frame.ndim == 3:
            frame = frame.sum(axis=0, dtype=np.float64)
        br, bc = self._chip_grid.shape
        blocks = frame.reshape(br, CHIP_SIZE, bc, CHIP_SIZE).sum(axis=(1, 3), dtype=np.float64)
        out = np.empty(self.n_chips)
        out[self._chip_grid.ravel()] = blocks.ravel()
        return out

    def split_half_modules(self, image: NDArray) -> list[NDArray]:
        """The 256 x 1024 block of each half module (views), in half-module order."""
        return [image[self.half_module_slice(hm)] for hm in range(self.n_half_modules)]

    def join_half_modules(self, blocks: list[NDArray], dtype=None) -> NDArray:
        """Assemble an image from one 256 x 1024 block per half module."""
        if len(blocks) != self.n_half_modules:
            raise ValueError(f"a {self.name} has {self.n_half_modules} half modules, "
                             f"got {len(blocks)} blocks")
        out = np.empty(self.shape, dtype=dtype or np.asarray(blocks[0]).dtype)
        for hm, block in enumerate(blocks):
            out[self.half_module_slice(hm)] = block
        return out

    def _check_hm(self, hm: int) -> None:
        if not 0 <= hm < self.n_half_modules:
            raise IndexError(f"half module {hm} outside 0..{self.n_half_modules - 1} "
                             f"for a {self.name}")


def geometry(name: str) -> EigerGeometry:
    """The EigerGeometry of a layout name: 250k, 500k, 1M, 1.5M, 2M or 9M."""
    try:
        layout = _LAYOUTS[name]
    except KeyError:
        raise ValueError(f"unknown EIGER geometry {name!r}; use one of "
                         f"{', '.join(GEOMETRIES)}") from None
    if layout is None:
        return EigerGeometry(name, 1, 1, single_half_module=True)
    return EigerGeometry(name, *layout)
