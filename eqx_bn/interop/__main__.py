"""`python -m eqx_bn.interop CHECKPOINT OUTPUT --model MODULE:FACTORY`; see `cli.py`."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m eqx_bn.interop"))
