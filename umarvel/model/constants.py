"""Model constants that torch-free modules (configs, the CLI) need too; importing this loads no torch."""

#: Initial contrastive temperature of every stage (the published chain resets it at each stage start, D2).
DEFAULT_TEMPERATURE = 0.05
