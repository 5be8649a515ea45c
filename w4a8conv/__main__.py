"""`python -m w4a8conv` runs the command line."""
from .cli import main

main()
