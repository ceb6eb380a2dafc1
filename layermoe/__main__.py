"""`python -m layermoe` (what `accelerate launch -m layermoe ...` runs)."""

from layermoe.cli import main

main()
