"""S-curve fitting of many modules (or a whole detector) with Dask.

Each task runs :func:`calbench.analysis.scurve.fit_scurves` on one module or one block of
rows, so a 9M detector is fitted block by block by a dask.distributed cluster with the memory
of one block per worker thread.  The per-pixel engine is the same as the local one, so the
results are identical to a local fit.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from typing import Any

import dask
import dask.array as da
import numpy as np
from numpy.typing import ArrayLike, NDArray

from .scurve import SCURVE_DTYPE, TRIMBIT_DTYPE, fit_scurves, fit_trimbit_scans

__all__ = ["fit_scurves_dask", "fit_scurves_distributed", "fit_trimbit_scans_dask",
           "dask_client", "compute", "SCHEDULER_ENV"]

#: Address of the dask.distributed scheduler the large analyses run on (e.g.
#: ``tcp://analysis-host:8786``); unset: a LocalCluster on this host.
SCHEDULER_ENV = "CALBENCH_DASK_SCHEDULER"
_local: dict[str, Any] = {}
_local_lock = threading.Lock()


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


def _fit_trimbit_block(block, target_block, mask_block, *, x, fit_kwargs):
    lead = block.shape[:-1]
    if block.size == 0:
        return np.empty(lead, dtype=TRIMBIT_DTYPE)
    cols, n = block.shape[-2], block.shape[-1]
    return fit_trimbit_scans(x, block.reshape(-1, cols, n),
                             np.asarray(target_block).reshape(-1, cols),
                             np.asarray(mask_block).reshape(-1, cols), **fit_kwargs).reshape(lead)


def fit_trimbit_scans_dask(
    trimbits: ArrayLike,
    counts: da.Array,
    target: ArrayLike,
    mask: ArrayLike | None = None,
    *,
    client: Any | None = None,
    **fit_kwargs: Any,
) -> da.Array:
    """Lazy :func:`~calbench.analysis.scurve.fit_trimbit_scans` of a dask array
    [rows, cols, n_points], block by block (the target and mask follow the blocks of counts).
    Returns a dask array of TRIMBIT_DTYPE records [rows, cols].

    With a dask.distributed ``client`` the target and mask images (9 bytes a pixel: ~81 MB at
    9M) are scattered to every worker once and each task cuts its block out of them; without one
    they are embedded in the graph (fine for dask's local schedulers, a "large graph" for a
    cluster). Compute the result on that client."""
    xa = np.asarray(trimbits, dtype=np.float64)
    if not isinstance(counts, da.Array) or counts.ndim != 3 or counts.shape[-1] != xa.size:
        raise ValueError(f"counts must be a dask array [rows, cols, {xa.size}], got "
                         f"{type(counts).__name__} {getattr(counts, 'shape', '')}")
    counts = counts.rechunk({2: -1})
    chunks = counts.chunks[:2]
    if tuple(np.shape(target)) != counts.shape[:2]:
        raise ValueError(f"target must have shape {counts.shape[:2]}, got {np.shape(target)}")
    t = np.asarray(target, dtype=np.float64)
    m = np.zeros(counts.shape[:2], bool) if mask is None else np.asarray(mask, dtype=bool)
    kw = {"x": xa, "fit_kwargs": dict(fit_kwargs)}
    if client is None:
        dtarget = da.from_array(t, chunks=chunks)[..., None]
        dmask = da.from_array(m, chunks=chunks)[..., None]
        return da.map_blocks(
            lambda c, tb, k, **kw: _fit_trimbit_block(c, tb[..., 0], k[..., 0], **kw),
            counts, dtarget, dmask, drop_axis=2, dtype=TRIMBIT_DTYPE,
            meta=np.empty((0, 0), dtype=TRIMBIT_DTYPE), **kw)
    t_future, m_future = client.scatter([t, m], broadcast=True, hash=False)
    blocks = counts.to_delayed()
    starts = [np.concatenate([[0], np.cumsum(c)]) for c in chunks]
    rows = []
    for i, nr in enumerate(chunks[0]):
        line = []
        for j, nc in enumerate(chunks[1]):
            where = (slice(starts[0][i], starts[0][i + 1]), slice(starts[1][j], starts[1][j + 1]))
            task = dask.delayed(_fit_trimbit_cut, pure=True)(blocks[i, j, 0], t_future, m_future,
                                                             where, **kw)
            line.append(da.from_delayed(task, (nr, nc), dtype=TRIMBIT_DTYPE))
        rows.append(line)
    return da.block(rows)


def _fit_trimbit_cut(block, target, mask, where, *, x, fit_kwargs):
    """_fit_trimbit_block on the block ``where`` of whole target and mask images (scattered)."""
    return _fit_trimbit_block(block, target[where], mask[where], x=x, fit_kwargs=fit_kwargs)


def dask_client(address: str | None = None) -> Any:
    """The dask.distributed client large analyses compute on.

    ``address`` (or ``$CALBENCH_DASK_SCHEDULER``): connect to that scheduler (any distributed
    cluster). Otherwise the client in effect, else a LocalCluster started once per process: one
    single-threaded worker process per core (the fitting engine's threads would only compete)."""
    from distributed import Client, LocalCluster

    address = address or os.environ.get(SCHEDULER_ENV) or None
    with _local_lock:
        if address:
            client = _local.get(address)
            if client is None or client.status != "running":
                try:
                    client = _local[address] = Client(address, timeout="20s",
                                                      set_as_default=False)
                except OSError as exc:
                    raise RuntimeError(
                        f"no dask scheduler answers at {address} ({exc}); start it "
                        f"(`dask scheduler`) or unset {SCHEDULER_ENV} to use a local "
                        "cluster") from None
            return client
        current = _current_client()
        if current is not None:
            return current
        client = _local.get("local")
        if client is None or client.status != "running":
            cluster = LocalCluster(n_workers=os.cpu_count() or 1, threads_per_worker=1,
                                   processes=True, dashboard_address=":0")
            client = _local["local"] = Client(cluster, set_as_default=False)
        return client


def compute(*arrays: da.Array, client: Any | None = None) -> list[np.ndarray]:
    """Compute dask arrays together on ``client`` (default :func:`dask_client`): blocks they
    share (e.g. the frames read from a file) are read once. Each block comes back to this process
    on its own and goes into its place in the result, so no worker ever assembles a whole result
    (dask's own gathering concatenates on one worker: a 9M fit map is ~1 GB)."""
    from distributed import as_completed

    client = client or dask_client()
    outputs, places = [], []
    for i, arr in enumerate(arrays):
        outputs.append(np.empty(arr.shape, dtype=arr.dtype))
        starts = [np.concatenate([[0], np.cumsum(c)]) for c in arr.chunks]
        for index, block in np.ndenumerate(arr.to_delayed()):
            where = tuple(slice(starts[d][k], starts[d][k + 1]) for d, k in enumerate(index))
            places.append((i, where, block))
    futures = client.compute([block for _, _, block in places])
    slot = {f.key: (i, where) for f, (i, where, _) in zip(futures, places)}
    for future, block in as_completed(futures, loop=client.loop, with_results=True):
        i, where = slot[future.key]
        outputs[i][where] = block
        future.release()
    return outputs
