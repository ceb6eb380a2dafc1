"""layermoe: teach a dense causal LM new languages with layer-wise mixture-of-experts."""

__version__ = "0.1.0"
