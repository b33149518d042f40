"""
Fixtures for imml-mac's tests; helpers live in mac_helpers.py.
"""

from mac_helpers import events  # noqa: F401  (a fixture)
