"""
``python -m imml.mac``: the ``imml-mac`` command without a console script.
"""

from __future__ import annotations

import sys

from imml.mac.tap import main

sys.exit(main(program="python -m imml.mac"))
