"""
Reading the balancer's option values: numbers within bounds, sizes, and
where each value came from (L{Origin}), so that a value that cannot be
used is refused by a message naming it where the user wrote it
(C{--rise must be at least 1, not 0}, or C{imml.toml, line 3: rise must
be at least 1, not 0}).
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Optional, Sequence

from attrs import frozen
from twisted.python import usage


class BadValue(usage.UsageError):
    """
    An option's value cannot be used: which option, and why (C{must be at
    least 1, not 0}).  Its message names the option as the command line
    writes it; L{Origin.subject} names it where else it came from.
    """

    def __init__(self, option: str, reason: str) -> None:
        super().__init__(f"--{option} {reason}")
        self.option, self.reason = option, reason


@frozen
class Origin:
    """
    Where an option's value came from.

    @ivar kind: C{default}, C{command line}, C{file} or C{environment}.
    @ivar where: for a file, its name and the line; for the environment,
        the variable (C{$IMML_BACKENDS}).
    """

    kind: str
    where: str = ""

    def __str__(self) -> str:
        return f"{self.kind} ({self.where})" if self.where else self.kind

    def subject(self, option: str) -> str:
        """
        How a message names option C{option} set here: C{--rise},
        C{imml.toml, line 3: rise}, C{$IMML_BACKENDS}.
        """
        if self.kind == "file":
            return f"{self.where}: {option}"
        if self.kind == "environment":
            return self.where
        return f"--{option}"

    def tell(self, message: str) -> str:
        """
        C{message}, about a value set here, after the file and line or the
        variable that set it.
        """
        return f"{self.where}: {message}" if self.where else message


DEFAULT = Origin("default")
COMMAND_LINE = Origin("command line")


def _shown(text: str) -> str:
    """
    A rejected value as a message shows it: a number as written, anything
    else quoted.
    """
    try:
        float(text)
    except ValueError:
        return repr(text)
    return text.strip()


def number(
    option: str, whole: bool = False, least: Optional[float] = None, most: Optional[int] = None
) -> Callable[[str], Any]:
    """
    The reader of option C{option}'s number: whole or not, at least
    C{least} (with no C{least}: greater than 0), at most C{most}; a value
    out of bounds is a L{BadValue}.
    """
    kind = "a whole number" if whole else "a number"
    bound = "greater than 0" if least is None else f"at least {least}"
    if most is not None:
        bound = f"from {0 if least is None else least} to {most}"

    def read(text: str) -> Any:
        try:
            value = int(text) if whole else float(text)
        except ValueError:
            joined = " of " if bound.startswith("at least") else " "
            raise BadValue(option, f"must be {kind}{joined}{bound}, not {_shown(text)}") from None
        if (
            not math.isfinite(value)
            or (value <= 0 if least is None else value < least)
            or (most is not None and value > most)
        ):
            raise BadValue(option, f"must be {bound}, not {_shown(text)}")
        return value

    return read


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmg]i?b?|b)?\s*$", re.I)
_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def parse_size(text: str) -> int:
    """
    A size such as C{100M}, C{100MiB}, C{512k} or C{1048576}, in bytes
    (binary units).

    @raise ValueError: saying what a size looks like.
    """
    m = _SIZE.match(text)
    if not m:
        raise ValueError(f"must be a size such as 100M, 512k or 1048576, not {text!r}")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "")[:1].lower()])


def size_text(size: int) -> str:
    """
    A size in bytes as L{parse_size} reads it, in the largest binary unit
    that divides it.
    """
    for unit in "GMk":
        factor = _UNITS[unit.lower()]
        if size and size % factor == 0:
            return f"{size // factor}{unit}"
    return str(size)


def reading(option: str, parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """
    The reader of option C{option} that C{parse} makes of its text: a
    C{ValueError} it raises is a L{BadValue} of the option.
    """

    def read(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as e:
            raise BadValue(option, str(e)) from None

    return read


def size(option: str) -> Callable[[str], int]:
    """
    The reader of option C{option}'s size (L{parse_size}).
    """
    return reading(option, parse_size)


def choice(option: str, choices: Sequence[str]) -> Callable[[str], str]:
    """
    The reader of option C{option}, one of C{choices}; another value is a
    L{BadValue} listing them.
    """

    def read(text: str) -> str:
        if text not in choices:
            raise BadValue(option, f"must be {' or '.join(choices)}, not {_shown(text)}")
        return text

    return read


def flag(option: str, value: Any) -> int:
    """
    A flag's value in the configuration file, C{true} or C{false}, as the
    command line sets it (1 or 0).
    """
    if not isinstance(value, bool):
        raise BadValue(option, f"must be true or false, not {value!r}")
    return int(value)
