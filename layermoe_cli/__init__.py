"""layermoe: teach a dense causal LM new languages with layer-wise mixture-of-experts."""

__version__ = "0.1.0"


def _register_auto_classes() -> None:
    """Let AutoConfig / AutoModelForCausalLM load `model_type: layermoe` without trust_remote_code."""
    try:
        from layermoe_cli.modeling import register_auto_classes
    except ImportError:  # torch or transformers missing: the manifest-only tools still work
        return
    register_auto_classes()


_register_auto_classes()
