"""`python -m trainer train ...`: the entry point torchrun starts in every process."""

from trainer.app import main

main()
