"""
``imml-balancer [options]``: the container's entrypoint (and a service
manager's), which runs ``twistd --nodaemon --pidfile= imml-balancer`` with
the options containers give as environment variables:

- C{IMML_STRATEGY}: C{--strategy};
- C{IMML_CONFIG}: C{--config}.

A variable stands for its option when the command line does not give it;
like the command line, it then wins over the configuration file.  Empty
means unset.  A bad value stops start-up with one line naming the variable.
(C{IMML_BACKENDS}, C{IMML_ADMIN_TOKEN}, C{IMML_ADMIN_TOKEN_FILE} and
C{IMML_ADMIN_HOSTS} are read by the options themselves: L{imml.tap}.)

Then the process becomes twistd (C{exec}): in a container twistd is PID 1
and gets C{docker stop}'s SIGTERM itself.
"""

from __future__ import annotations

import getopt
import os
import shutil
import sys
from typing import Mapping, Optional, Sequence

from .strategies import UnknownStrategy, strategy_named
from .tap import Options

#: Each variable, and the option it stands for.
VARIABLES = {"IMML_STRATEGY": "strategy", "IMML_CONFIG": "config"}


class BadVariable(ValueError):
    """
    An environment variable's value cannot be used; the message names it.
    """


def given_options(argv: Sequence[str]) -> set[str]:
    """
    The long names of the options C{argv} gives, however spelled (C{-s x},
    C{-sx}, C{--strategy=x}, an abbreviation); none if it cannot be parsed
    (twistd then says why).
    """
    options = Options()
    try:
        pairs, _ = getopt.getopt(list(argv), options.shortOpt, options.longOpt)
    except getopt.GetoptError:
        return set()
    return {options.synonyms.get(flag.lstrip("-"), flag.lstrip("-")) for flag, _ in pairs}


def _check(variable: str, option: str, value: str) -> None:
    if option == "strategy":
        try:
            strategy_named(value)
        except UnknownStrategy as e:
            raise BadVariable(f"{variable}: {e}") from None
    elif option == "config":
        try:
            with open(value, "rb"):
                pass
        except OSError as e:
            raise BadVariable(f"{variable}: {value}: cannot read it: {e.strerror}") from None


def options_from_environment(argv: Sequence[str], environ: Mapping[str, str]) -> list[str]:
    """
    The options the variables in C{environ} add to the command line C{argv}.

    @raise BadVariable: when a variable that counts has a bad value.
    """
    given = given_options(argv)
    added = []
    for variable, option in VARIABLES.items():
        value = environ.get(variable, "").strip()
        if value and option not in given:
            _check(variable, option, value)
            added += [f"--{option}", value]
    return added


def twistd_path() -> str:
    """
    The twistd beside this Python (the one imml is installed for), else on PATH.
    """
    beside = os.path.join(os.path.dirname(sys.executable), "twistd")
    return beside if os.path.exists(beside) else shutil.which("twistd") or beside


def main(argv: Optional[Sequence[str]] = None, environ: Optional[Mapping[str, str]] = None) -> int:
    """
    Become C{twistd --nodaemon --pidfile= imml-balancer}, with the options
    from the environment and then C{argv}; or say in one line which
    variable is bad and return 1.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        added = options_from_environment(argv, os.environ if environ is None else environ)
    except BadVariable as e:
        print(f"imml-balancer: {e}", file=sys.stderr)
        return 1
    twistd = twistd_path()
    os.execv(twistd, [twistd, "--nodaemon", "--pidfile=", "imml-balancer", *added, *argv])
