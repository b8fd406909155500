"""``python -m signscale`` and ``torchrun -m signscale ...``."""

import sys

from signscale.cli import main

if __name__ == "__main__":
    sys.exit(main())
