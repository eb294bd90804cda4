"""``python -m lightning_qlora.quant_report``: the same as ``lightning-qlora-quant-report``."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
