"""
imml: spread Immich's machine-learning work over the machines you own.

The balancer's pieces live in small modules, one job each (the table is in
``docs/architecture.md``): :mod:`imml.interfaces` holds the strategy
contract, :mod:`imml.strategies` the strategies, :mod:`imml.testing` a fake
Immich ML server and the fakes for testing a strategy of your own.
"""

__version__ = "0.1.0"
