"""S-curve fitting of many modules (or a whole detector) with Dask.

Each task runs :func:`calbench.analysis.scurve.fit_scurves` on one module or one block of
rows, so a 9M detector is fitted block by block by a dask.distributed cluster with the memory
of one block per worker thread.  The per-pixel engine is the same as the local one, so the
results are identical to a local fit.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import dask
import dask.array as da
import numpy as np
from numpy.typing import ArrayLike, NDArray

from .scurve import SCURVE_DTYPE, fit_scurves

__all__ = ["fit_scurves_dask", "fit_scurves_distributed"]


def _fit_block(
    block: np.ndarray,
    mask_block: np.ndarray | None = None,
    *,
    x: NDArray[np.float64],
    fit_kwargs: dict[str, Any],
) -> NDArray[np.void]:
    """Fit one block [..., rows, cols, n] (any number of leading axes) of a dask array."""
    lead = block.shape[:-1]
    if block.size == 0:
        return np.empty(lead, dtype=SCURVE_DTYPE)
    cols, n = block.shape[-2], block.shape[-1]
    flat = block.reshape(-1, cols, n)
    mask = None if mask_block is None else np.asarray(mask_block).reshape(-1, cols)
    return fit_scurves(x, flat, mask, **fit_kwargs).reshape(lead)


def fit_scurves_dask(
    x: ArrayLike,
    counts: da.Array,
    mask: ArrayLike | da.Array | None = None,
    **fit_kwargs: Any,
) -> da.Array:
    """Lazy per-pixel S-curve fit of a dask array.

    Parameters
    ----------
    x : [n_points] scanned setting (e.g. threshold DAC units), strictly increasing.
    counts : dask array [..., rows, cols, n_points] of counts, e.g. [modules, rows, cols, n]
        or a whole detector [rows, cols, n] chunked along rows.  The points axis is merged into
        one chunk if needed; every block is fitted independently.
    mask : optional bool array of shape counts.shape[:-1], True = pixel excluded.
    **fit_kwargs : keyword arguments of :func:`~calbench.analysis.scurve.fit_scurves`.

    Returns
    -------
    dask array of :data:`~calbench.analysis.scurve.SCURVE_DTYPE` records with shape
    counts.shape[:-1] and the chunks of counts without the points axis.
    """
    xa = np.asarray(x, dtype=np.float64)
    if not isinstance(counts, da.Array):
        raise ValueError("counts must be a dask array; use fit_scurves for numpy arrays")
    if counts.ndim < 3:
        raise ValueError(f"counts must be [..., rows, cols, n_points], got shape {counts.shape}")
    if counts.shape[-1] != xa.size:
        raise ValueError(
            f"counts has {counts.shape[-1]} points per pixel but x has {xa.size}; "
            "the last axis of counts must match x"
        )
    # A pixel's whole curve must be in one block; blocks may split rows and columns freely.
    counts = counts.rechunk({counts.ndim - 1: -1})
    out_chunks = counts.chunks[:-1]
    meta = np.empty((0,) * (counts.ndim - 1), dtype=SCURVE_DTYPE)
    kw = {"x": xa, "fit_kwargs": dict(fit_kwargs)}
    if mask is None:
        return da.map_blocks(
            _fit_block, counts, drop_axis=counts.ndim - 1, dtype=SCURVE_DTYPE, meta=meta, **kw
        )
    if tuple(np.shape(mask)) != counts.shape[:-1]:
        raise ValueError(f"mask must have shape {counts.shape[:-1]}, got {np.shape(mask)}")
    dmask = mask.rechunk(out_chunks) if isinstance(mask, da.Array) else da.from_array(
        np.asarray(mask, dtype=bool), chunks=out_chunks
    )
    # Give the mask a dummy points axis so both inputs share the block structure.
    dmask = dmask[..., None]
    return da.map_blocks(
        lambda c, m, **k: _fit_block(c, m[..., 0], **k),
        counts,
        dmask,
        drop_axis=counts.ndim - 1,
        dtype=SCURVE_DTYPE,
        meta=meta,
        **kw,
    )


def _current_client() -> Any | None:
    """The dask.distributed client in effect, or None when there is none."""
    try:
        from distributed import get_client
    except ImportError:  # pragma: no cover - distributed is a declared dependency
        return None
    try:
        return get_client()
    except ValueError:
        return None


def fit_scurves_distributed(
    x: ArrayLike,
    counts: Sequence[ArrayLike] | da.Array,
    client: Any | None = None,
    *,
    mask: Sequence[ArrayLike | None] | ArrayLike | None = None,
    **fit_kwargs: Any,
) -> list[NDArray[np.void]] | NDArray[np.void]:
    """Fit many modules, or a large chunked array, on a dask.distributed cluster.

    Parameters
    ----------
    x : [n_points] scanned setting (e.g. threshold DAC units), strictly increasing.
    counts : either a sequence of per-module arrays [rows, cols, n_points] (one task per
        module; arrays are scattered to the workers, not embedded in the task graph), or a
        dask array [..., rows, cols, n_points] (one task per block, see
        :func:`fit_scurves_dask`).
    client : a ``distributed.Client``; default: the client in effect, else dask's local
        scheduler.
    mask : for a sequence, a sequence of per-module masks (or None); for a dask array, one
        array of shape counts.shape[:-1].  True = pixel excluded.
    **fit_kwargs : keyword arguments of :func:`~calbench.analysis.scurve.fit_scurves`.

    Returns
    -------
    For a sequence: a list of [rows, cols] :data:`SCURVE_DTYPE` arrays, in input order.
    For a dask array: one numpy :data:`SCURVE_DTYPE` array of shape counts.shape[:-1].
    """
    xa = np.asarray(x, dtype=np.float64)
    if client is None:
        client = _current_client()

    if isinstance(counts, da.Array):
        lazy = fit_scurves_dask(xa, counts, mask, **fit_kwargs)
        if client is None:
            return lazy.compute()
        return client.compute(lazy, sync=True)

    modules = list(counts)
    masks = [None] * len(modules) if mask is None else list(mask)
    if len(masks) != len(modules):
        raise ValueError(f"got {len(masks)} masks for {len(modules)} modules")
    if client is None:
        tasks = [
            dask.delayed(fit_scurves)(xa, m, k, **fit_kwargs) for m, k in zip(modules, masks)
        ]
        return list(dask.compute(*tasks))
    data = client.scatter([np.asarray(m) for m in modules])
    mask_futures = [None if k is None else client.scatter(np.asarray(k)) for k in masks]
    futures = client.map(
        lambda m, k: fit_scurves(xa, m, k, **fit_kwargs), data, mask_futures, pure=False
    )
    return client.gather(futures)
