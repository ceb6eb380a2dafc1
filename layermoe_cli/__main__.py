"""`python -m layermoe_cli` (deprecated name of `python -m layermoe`)."""

import layermoe_cli  # noqa: F401  (the deprecation warning)
from layermoe.cli import main

main()
