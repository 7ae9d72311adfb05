"""`python -m workers` is the `wxcoupon` command."""
from .cli import main

main()
