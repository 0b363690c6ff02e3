"""`torchrun --nproc_per_node N -m minilora.distributed <minilora.train flags>`: minilora.train's command
line, the same loop and flags, with --strategy full_shard as the default."""
import sys

from minilora.train.cli import main

sys.exit(main(entry="minilora.distributed"))
