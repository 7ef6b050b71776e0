"""Derived runs: an analysis' results recorded as a run in the catalog of the scan it came from.

Every procedure records its analyses this way (the EIGER steps, the BatMet sink fit, the FEE
transit-time fit). `record_results(values, arrays, path, md=...)` opens a run (``start.parent_uid``
links it to its scan, ``start.analysis`` names the function that produced it), reads one
`AnalysisResults` object into stream "results" (or the one named) and closes the run. Small values
(numbers, short lists, tables per chip) are event data; image-sized arrays are written to an HDF5
file in the detector's data directory and registered as external data (StreamResource/StreamDatum),
as detector frames are, so tiled serves ``run["results"]["mu"]`` without pushing megabytes through
the event stream.
"""
from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path

import bluesky.plan_stubs as bps
import numpy as np
from event_model import compose_stream_resource
from ophyd.status import Status

from calbench.analysis.eiger_files import write_result_arrays

__all__ = ["AnalysisResults", "record_results", "RESULTS_STREAM"]

RESULTS_STREAM = "results"


def _plain(value):
    """Plain Python numbers and lists (documents are serialised as JSON/msgpack)."""
    if isinstance(value, (np.ndarray, np.generic)):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _describe_value(value) -> dict:
    a = np.asarray(value)
    if a.dtype.kind in "US":
        return {"dtype": "string", "shape": []}
    if a.ndim == 0:
        return {"dtype": "integer" if a.dtype.kind in "iub" else "number", "shape": [],
                "dtype_numpy": a.dtype.str}
    return {"dtype": "array", "shape": list(a.shape), "dtype_numpy": a.dtype.str}


class AnalysisResults:
    """A readable holding one analysis' results (bluesky's Readable and WritesExternalAssets).

    values: small results, stored as event data; arrays: image-sized arrays, written to ``path``
    (HDF5) when triggered and stored as external data."""

    def __init__(self, name: str, values: Mapping, arrays: Mapping, path: str | Path):
        self.name = name
        self.parent = None
        self.values = {k: _plain(v) for k, v in values.items()}
        self.arrays = {k: np.asarray(v) for k, v in arrays.items()}
        # the arrays are let go once written (shapes and dtypes stay): the RunEngine holds every
        # object a plan reads until the plan ends, and a view holds its whole base (a 9M EIGER's
        # S-curve maps are views of its ~1 GB fit map)
        self._specs = {k: (a.shape, a.dtype) for k, a in self.arrays.items()}
        self.path = Path(path)
        self._asset_docs: list = []
        self._time = time.time()

    @property
    def hints(self) -> dict:
        return {"fields": []}

    def trigger(self) -> Status:
        datasets = write_result_arrays(self.path, self.arrays) if self.arrays else {}
        self.arrays = {}
        uri = self.path.resolve().as_uri().replace("file:///", "file://localhost/")
        self._asset_docs.clear()
        for key, dataset in datasets.items():
            shape = self._specs[key][0]
            bundle = compose_stream_resource(
                mimetype="application/x-hdf5", uri=uri, data_key=key,
                parameters={"dataset": dataset, "chunk_shape": (1, *shape)})
            self._asset_docs.append(("stream_resource", bundle.stream_resource_doc))
            self._asset_docs.append(("stream_datum",
                                     bundle.compose_stream_datum(indices={"start": 0, "stop": 1})))
        self._time = time.time()
        status = Status(obj=self)
        status.set_finished()
        return status

    def read(self) -> dict:
        return {k: {"value": v, "timestamp": self._time} for k, v in self.values.items()}

    def describe(self) -> dict:
        desc = {k: {"source": f"analysis:{self.name}", **_describe_value(v)}
                for k, v in self.values.items()}
        for k, (shape, dtype) in self._specs.items():
            dtype = np.dtype(np.uint8) if dtype == bool else dtype
            desc[k] = {"source": f"analysis:{self.name}", "dtype": "array",
                       "dtype_numpy": dtype.str, "shape": list(shape), "external": "STREAM:",
                       "dims": [f"dim_{i}" for i in range(len(shape))]}
        return desc

    def read_configuration(self) -> dict:
        return {}

    def describe_configuration(self) -> dict:
        return {}

    def collect_asset_docs(self):
        docs, self._asset_docs = self._asset_docs, []
        yield from docs


def record_results(values: Mapping, arrays: Mapping | None = None, path: str | Path | None = None,
                   *, md: dict, stream: str = RESULTS_STREAM):
    """Plan: one derived run holding ``values`` and ``arrays`` (see the module docstring) in one
    event of ``stream``; ``md`` must carry parent_uid and analysis. Arrays need ``path``, the HDF5
    file they are written to. Returns the run's uid."""
    missing = {"parent_uid", "analysis"} - set(md)
    if missing:
        raise ValueError(f"a derived run needs {sorted(missing)} in its metadata")
    if arrays and path is None:
        raise ValueError("a derived run with arrays needs the path of the HDF5 file they go to")
    results = AnalysisResults(md.get("step", "analysis"), values, arrays or {}, path or ".")
    uid = yield from bps.open_run(md=md)
    yield from bps.trigger_and_read([results], name=stream)
    yield from bps.close_run()
    return uid
