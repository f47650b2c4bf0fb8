"""One module per `qwen35c` subcommand; each defines a click command named `command`."""
