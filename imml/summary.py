"""
What the balancer says of itself: the settings in force that C{--check}
prints (L{report}).
"""

from __future__ import annotations

from typing import Any, Optional

from .values import size_text

#: Options whose value is a secret: only whether one is set is shown.
SECRET = {"admin-token"}


def host_text(name: Optional[str], address: str) -> str:
    """
    A host as it is shown: C{nas (192.168.0.5:3003)}, or its address
    alone when the configuration gives it no name.
    """
    return f"{name} ({address})" if name else address


def _value_text(options: Any, name: str, flags: set) -> str:
    value = options[name]
    if name in SECRET:
        return "set" if value is not None else "none"
    if name in flags:
        return "on" if value else "off"
    if value is None:
        return "none"
    if name == "max-body":
        return size_text(value)
    if isinstance(value, tuple):
        return ", ".join(value) or "none"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _settings_text(settings: Any) -> str:
    return "; ".join(
        [
            f"weight {settings.weight:g}",
            f"slots {settings.slots if settings.slots is not None else 'learned'}",
            f"tier {settings.tier}",
            f"tasks {', '.join(sorted(settings.tasks)) if settings.tasks is not None else 'all'}",
            *([f"mac {settings.mac}"] if settings.mac else []),
        ]
    )


def report(options: Any, version: str) -> str:
    """
    What C{--check} prints: every option (in the order of C{--help}), its
    value in force, and where that came from; then the hosts.  A secret's
    value is never shown.

    @param options: the parsed L{imml.tap.Options}, with their C{origins}.
    """
    flags = {row[0] for row in options.optFlags}
    names = [row[0] for row in options.optParameters] + [*options.repeated] + sorted(flags - {"check"})
    rows = [("option", "value", "from")]
    rows += [(name, _value_text(options, name, flags), str(options.origins[name])) for name in names]
    width = [max(len(row[i]) for row in rows) for i in range(2)]
    lines = [f"imml {version}: the configuration is valid; the settings in force:"]
    lines += [f"  {row[0]:{width[0]}}  {row[1]:{width[1]}}  {row[2]}".rstrip() for row in rows]
    hosts = options["hosts"]
    origin = options.origins.get("hosts", "")
    if not hosts and options["demo"]:
        lines.append(f"hosts: {options['demo']} stand-in hosts, started with the balancer (from {origin})")
        return "\n".join(lines)
    lines.append(f"hosts ({len(hosts)}, from {origin}):")
    named = [(host_text(settings.name, str(address)), settings) for address, settings in hosts]
    width_host = max(len(text) for text, _ in named)
    lines += [f"  {text:{width_host}}  {_settings_text(settings)}" for text, settings in named]
    if options["demo"]:
        lines.append(f"  and {options['demo']} stand-in hosts, started with the balancer (--demo)")
    return "\n".join(lines)
