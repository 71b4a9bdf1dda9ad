import sys

from lowrank_ops.cli import entry

sys.exit(entry())
