"""Model constants that torch-free modules (configs, the CLI) need too; importing this loads no torch."""

#: Backbone families (``config.model_type``) of the registry (``umarvel.model.backbones``) and of the tiny models.
BACKBONES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")

#: Initial contrastive temperature of every stage (the published chain resets it at each stage start, D2).
DEFAULT_TEMPERATURE = 0.05
