"""Formats the tiled server offers beyond its defaults: BlueskyRun as application/json-seq.

`run.documents()` (bluesky-tiled-plugins and databroker clients) asks the server for the run's
documents as a JSON text sequence; without this exporter the server answers 406 and past runs
cannot be replayed into callbacks. `calbench tiled serve` (calbench.tiled_serve) registers it
before building its app.
"""
from __future__ import annotations

JSON_SEQ = "application/json-seq"


def register_exporters(registry=None):
    """Add the json-seq exporter of BlueskyRun to `registry` (tiled's default one if None)."""
    from bluesky_tiled_plugins.exporters import json_seq_exporter
    from tiled.media_type_registration import default_serialization_registry

    registry = registry if registry is not None else default_serialization_registry
    registry.register("BlueskyRun", JSON_SEQ, json_seq_exporter)
    return registry

