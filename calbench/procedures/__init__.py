"""The lab's procedures, one module each, on top of every layer: a procedure's `calbench <name>`
subcommands (`add_cli(subparsers)`), its demo step (`demo_step(ctx)`) and its studies. The plans,
devices and analysis they drive live in the layers below; only the core's CLI dispatch (calbench.cli)
imports this package (tests/test_import_rules.py)."""
