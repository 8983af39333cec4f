"""The subcommands of the `trainguard` command, one module each, each exposing `register(subparsers)`."""
