"""
imml: spread Immich's machine-learning work over the machines you own.

The balancer's pieces live in small modules, one job each (the table is in
``docs/architecture.md``): :mod:`imml.interfaces` holds the strategy
contract, :mod:`imml.strategies` the strategies, :mod:`imml.testing` a fake
Immich ML server and the fakes for testing a strategy of your own.
"""

__version__ = "0.1.0"

#: The DNS-SD service type imml-mac advertises and the balancer browses
#: for (C{--discover mdns}): Immich ML over HTTP.
MDNS_SERVICE = "_immich-ml._tcp.local."


def version_line() -> str:
    """
    What C{--version} prints: imml's version, and the Twisted and Python it
    runs on.
    """
    import platform

    from twisted import __version__ as twisted_version

    return f"imml {__version__} (Twisted {twisted_version}, Python {platform.python_version()})"
