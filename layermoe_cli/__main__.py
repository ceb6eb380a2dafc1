"""`python -m layermoe_cli` (what `accelerate launch -m layermoe_cli ...` runs)."""

from layermoe_cli.cli import main

main()
