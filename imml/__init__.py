"""
imml: spread Immich's machine-learning work over the machines you own.

The balancer's pieces live in small modules: :mod:`imml.backends` (addresses),
:mod:`imml.interfaces` (the strategy contract), :mod:`imml.strategies`,
:mod:`imml.fleet` (observed state), :mod:`imml.health`, :mod:`imml.dispatch`
and :mod:`imml.proxy`.  :mod:`imml.testing` holds a fake Immich ML server.
"""

__version__ = "0.1.0"
