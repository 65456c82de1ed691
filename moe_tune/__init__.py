"""moe_tune: instruction-tuning of pretrained Mixture-of-Experts language models."""

__version__ = "0.1.0"
