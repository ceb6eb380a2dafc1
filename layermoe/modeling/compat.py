"""The model files import the library shims as `.compat`, so that a saved checkpoint, which carries a
copy of `layermoe/compat.py` under this name, loads without layermoe. Inside the package this
re-exports that one module; nothing is defined here."""

from layermoe.compat import *  # noqa: F401,F403
from layermoe.compat import __all__  # noqa: F401
