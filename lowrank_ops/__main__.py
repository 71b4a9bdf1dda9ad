import sys

from lowrank_ops.cli import main

sys.exit(main())
