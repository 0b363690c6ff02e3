"""`python -m minilora.calc {params,vram,fit,cost,serve}`: the memory and cost calculators.

A thin entry point over calculators.cli; it imports neither torch nor the rest of minilora, so
it starts in a fraction of a second.
"""
import sys

from calculators.cli import main

if __name__ == "__main__":
    sys.exit(main())
