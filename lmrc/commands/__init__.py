"""CLI subcommand groups; each module has `register(subparsers)`."""
