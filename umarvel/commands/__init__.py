"""CLI subcommand modules (each exposes ``add_subparser``)."""
