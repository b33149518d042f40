"""
``python -m imml.mac``: the ``imml-mac`` command without a console script.
"""

import sys

from imml.mac.tap import main

sys.exit(main())
