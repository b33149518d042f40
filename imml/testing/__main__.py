"""
C{python -m imml.testing}: run one fake host (see L{imml.testing.cli}).
"""

from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
