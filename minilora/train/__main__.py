"""`python -m minilora.train`: the training command line (minilora/train/cli.py)."""
import sys

from minilora.train.cli import main

sys.exit(main())
