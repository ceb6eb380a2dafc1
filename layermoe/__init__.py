"""layermoe: teach a dense causal LM new languages with layer-wise mixture-of-experts.

Importing this package is light (no torch): the command line starts fast. The model classes
live in `layermoe.modeling`; importing it registers `model_type: layermoe` with transformers'
Auto classes, so `AutoModelForCausalLM.from_pretrained(checkpoint)` needs no remote code.
"""

__version__ = "0.1.0"
