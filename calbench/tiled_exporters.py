"""Formats the tiled server offers beyond its defaults: BlueskyRun as application/json-seq.

`run.documents()` (bluesky-tiled-plugins and databroker clients) asks the server for the run's
documents as a JSON text sequence; without this exporter the server answers 406 and past runs
cannot be replayed into callbacks. The server registers it before building its app:

    from calbench.tiled_exporters import register_exporters; register_exporters()
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


def main() -> int:
    """`python -m calbench.tiled_exporters serve catalog ...`: tiled's command line with the
    exporters registered (tiled serve builds its app on the default registry)."""
    import sys

    from tiled.commandline.main import main as tiled_main

    register_exporters()
    sys.argv[0] = "tiled"
    return tiled_main()


if __name__ == "__main__":
    raise SystemExit(main())
