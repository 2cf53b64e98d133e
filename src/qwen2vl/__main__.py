"""`python -m qwen2vl ...` runs the command-line interface (see qwen2vl.cli)."""

import sys

from qwen2vl.cli import main

sys.exit(main())
