"""
``twistd -n imml-mac``: run Immich ML on this Mac, supervised.

Commands (also available as ``python -m imml.mac COMMAND``):

* ``twistd -n imml-mac [options]``: pre-flight, then run and supervise
  ``python -m immich_ml`` (and caffeinate on macOS);
* ``twistd -n imml-mac setup [--immich DIR] [--ref vX.Y.Z]``: fetch Immich ML
  and create its environment;
* ``twistd -n imml-mac doctor [options]``: pre-flight plus a test model run
  through each provider;
* ``twistd -n imml-mac launchagent [options]``: start the service at login.

The three commands run before twistd starts its reactor and exit with their
status; only the service uses the reactor.
"""

from __future__ import annotations

import os
import pathlib
import sys
from typing import Any, Callable, Mapping, Optional, Sequence, Union

from twisted.application import service
from twisted.application.internet import backoffPolicy
from twisted.logger import Logger
from twisted.python import usage

from imml import version_line
from imml.mac import install, launchagent
from imml.mac.advertise import advertiser
from imml.mac.doctor import report_lines, run_doctor
from imml.mac.interpreter import Interpreter, ProbeError
from imml.mac.preflight import DEFAULT_PROVIDERS, Verdict, assess, parse_providers
from imml.mac.process_group import Command
from imml.mac.providers import child_environment, setting_name
from imml.mac.readiness import PingProbe, ping_url
from imml.mac.sleep import sleep_guard
from imml.mac.supervisor import Supervisor

log = Logger()


def find_ml_dir(path: Union[str, os.PathLike]) -> pathlib.Path:
    """
    The folder holding the ``immich_ml`` package: C{path} itself or its
    ``machine-learning/`` subfolder.
    """
    path = pathlib.Path(path).expanduser().resolve()
    for candidate in (path, path / install.SPARSE_FOLDER):
        if (candidate / "immich_ml").is_dir():
            return candidate
    raise usage.UsageError(
        f"{path} is neither an Immich checkout nor its machine-learning/ folder "
        f"(no immich_ml/ in it or in its machine-learning/). Run `imml-mac setup` "
        f"or pass --immich."
    )


def _port(value: str) -> int:
    port = int(value)
    if not 0 < port < 65536:
        raise ValueError(f"{value} is not a TCP port")
    return port


_port.coerceDoc = "A TCP port, 1 to 65535."


def _invocation(options: usage.Options) -> str:
    """
    The start of a usage line, up to imml-mac's own options: C{Usage:
    twistd [options] imml-mac} under twistd, C{Usage: imml-mac} (or the
    C{program} that L{main} was given) alone.
    """
    if options.parent is not None:
        return f"{options.parent.getSynopsis()} {options.parent.subCommand}"
    return f"Usage: {getattr(options, 'program', 'imml-mac')}"


class _Versioned(usage.Options):
    def opt_version(self) -> None:
        """Display imml's version (and Twisted's and Python's), then exit."""
        print(version_line())
        raise SystemExit(0)


class _Command(_Versioned):
    """
    The options of a command (C{setup}, C{doctor}, C{launchagent}): its
    usage line names it, after imml-mac's own.
    """

    synopsis = "[options]"

    def getSynopsis(self) -> str:
        return f"{_invocation(self.parent)} {self.parent.subCommand} {self.synopsis}"


class ServiceOptions(_Versioned):
    """
    The options of the service, shared by ``doctor`` and ``launchagent``.
    """

    optParameters = [
        ["immich", None, install.DEFAULT_TARGET, "The Immich checkout or its machine-learning/ folder."],
        ["python", None, None, "The interpreter to run Immich ML with [default: the folder's .venv/bin/python]."],
        ["host", None, "0.0.0.0", "The address Immich ML listens on (IMMICH_HOST)."],
        ["port", None, 3003, "The port Immich ML listens on (IMMICH_PORT).", _port],
        ["cache", None, install.DEFAULT_CACHE, "The model cache folder (MACHINE_LEARNING_CACHE_FOLDER)."],
        [
            "providers",
            None,
            ",".join(DEFAULT_PROVIDERS),
            "The execution providers Immich ML may use, most preferred first "
            "(short names such as CoreML,CPU work too).",
        ],
        ["model-ttl", None, None, "Seconds before an idle model is unloaded (MACHINE_LEARNING_MODEL_TTL).", int],
        ["workers", None, None, "Gunicorn workers (MACHINE_LEARNING_WORKERS).", int],
        ["ping-interval", None, 10.0, "Seconds between health checks of /ping.", float],
        ["ping-failures", None, 3, "Failed health checks in a row after which Immich ML is restarted.", int],
        ["start-timeout", None, 300.0, "Seconds Immich ML may take to answer its first /ping.", float],
        ["stop-timeout", None, 10.0, "Seconds between SIGTERM and SIGKILL on stop.", float],
        [
            "advertise-name",
            None,
            None,
            "The name the service is advertised under while it serves [default: this Mac's host name].",
        ],
    ]
    optFlags = [
        ["allow-sleep", None, "Do not keep the Mac awake while the service runs."],
        ["no-advertise", None, "Do not advertise the service on the local network (Bonjour, _immich-ml._tcp)."],
    ]

    def __init__(self) -> None:
        usage.Options.__init__(self)
        self["settings"] = []

    def opt_set(self, value: str) -> None:
        """
        A MACHINE_LEARNING_* setting, NAME=VALUE, prefix optional (e.g. PRELOAD__CLIP__TEXTUAL=ViT-B-32__openai); repeatable.
        """  # noqa: E501 (the docstring is --set's help, one line)
        name, sep, setting = value.partition("=")
        if not sep or not name.strip():
            raise usage.UsageError(f"--set wants NAME=VALUE, not {value!r}")
        self["settings"].append((setting_name(name), setting))

    def postOptions(self) -> None:
        try:
            self["providers"] = parse_providers(self["providers"])
        except ValueError as exc:
            raise usage.UsageError(f"--providers: {exc}") from None
        self["ml_dir"] = find_ml_dir(self["immich"])
        if self["python"] is None:
            self["python"] = str(self["ml_dir"] / ".venv" / "bin" / "python")
        elif os.sep in self["python"]:
            # A path, as the user's shell sees it: Immich ML runs in ml_dir.
            self["python"] = os.path.abspath(os.path.expanduser(self["python"]))
        self["cache"] = str(pathlib.Path(self["cache"]).expanduser().resolve())
        for name, option in (("MODEL_TTL", "model-ttl"), ("WORKERS", "workers")):
            if self[option] is not None:
                self["settings"].append((setting_name(name), str(self[option])))

    def settings(self) -> list[tuple[str, str]]:
        return list(self["settings"])

    def interpreter(self, env: Optional[Mapping[str, str]] = None, with_providers: bool = False) -> Interpreter:
        """
        The Immich interpreter with the child's environment (without the
        provider hook, for pre-flight, unless C{with_providers}).
        """
        env = child_environment(
            os.environ if env is None else env,
            self["python"],
            self["host"],
            self["port"],
            self["cache"],
            self["providers"] if with_providers else None,
            self.settings(),
        )
        return Interpreter(self["python"], str(self["ml_dir"]), env)

    def arguments(self) -> list[str]:
        """
        Options that recreate this configuration (for the LaunchAgent).
        """
        args = [
            f"--immich={self['ml_dir']}",
            f"--python={self['python']}",
            f"--host={self['host']}",
            f"--port={self['port']}",
            f"--cache={self['cache']}",
            f"--providers={','.join(self['providers'])}",
            f"--ping-interval={self['ping-interval']:g}",
            f"--ping-failures={self['ping-failures']}",
            f"--start-timeout={self['start-timeout']:g}",
            f"--stop-timeout={self['stop-timeout']:g}",
        ]
        args += [f"--set={name}={value}" for name, value in self["settings"]]
        if self["allow-sleep"]:
            args.append("--allow-sleep")
        if self["no-advertise"]:
            args.append("--no-advertise")
        if self["advertise-name"]:
            args.append(f"--advertise-name={self['advertise-name']}")
        return args


class SetupOptions(_Command):
    longdesc = (
        "Fetch Immich's machine-learning folder at a release (a shallow, sparse git clone), "
        "create its environment with uv, and the model cache folder; then check them. "
        "Safe to re-run; re-run with --ref to upgrade."
    )
    optParameters = [
        [
            "immich",
            None,
            install.DEFAULT_TARGET,
            "Where to put the Immich checkout (only machine-learning/ is fetched).",
        ],
        ["ref", None, None, "The Immich release tag [default: the newest vX.Y.Z]."],
        ["repo", None, install.DEFAULT_REPO, "The Immich git repository."],
        ["cache", None, install.DEFAULT_CACHE, "The model cache folder to create."],
        ["uv-python", None, None, "The Python version uv should use (uv sync --python)."],
    ]

    def plan(self) -> install.SetupPlan:
        return install.SetupPlan(
            target=self["immich"],
            cache=self["cache"],
            repo=self["repo"],
            ref=self["ref"],
            python=self["uv-python"],
        )


class DoctorOptions(_Command, ServiceOptions):
    longdesc = (
        "Check the interpreter Immich ML runs with (Python, immich_ml, onnxruntime and its providers) "
        "and run a tiny test model on each wanted provider. Takes the service's options. "
        "Exits 0 when the service would run as asked: on the first of --providers (Core ML by default)."
    )


class LaunchAgentOptions(_Command, ServiceOptions):
    longdesc = (
        "Write a macOS LaunchAgent (~/Library/LaunchAgents/LABEL.plist) that starts the service "
        "with these options at every login, and print how to load it."
    )
    optParameters = [["label", None, launchagent.LABEL, "The launchd label."]]


class Options(ServiceOptions):
    longdesc = (
        "Run Immich's machine-learning service on this Mac under supervision "
        "(restarted when it dies or stops answering /ping, Mac kept awake). "
        "See docs/mac.md."
    )
    subCommands = [
        ["setup", None, SetupOptions, "Fetch Immich ML and create its environment."],
        ["doctor", None, DoctorOptions, "Check the interpreter and run a test model on each provider."],
        ["launchagent", None, LaunchAgentOptions, "Write a LaunchAgent that starts the service at login."],
    ]

    def getSynopsis(self) -> str:
        start = _invocation(self)
        commands = "|".join(name for name, _, _, _ in self.subCommands)
        return f"{start} [options]\n{' ' * len('Usage:')} {start.removeprefix('Usage: ')} {commands} [options]"

    def postOptions(self) -> None:
        # A command validates its own options; setup has no checkout yet.
        if not self.subCommand:
            ServiceOptions.postOptions(self)


def _preflight(options: ServiceOptions, out: Callable[[str], object]) -> Verdict:
    """
    Pre-flight in the child's interpreter: log what it found; exit with the
    reasons if the service cannot start.
    """
    try:
        verdict = assess(options.interpreter().ask("facts"), options["providers"])
    except ProbeError as exc:
        out(f"imml-mac: pre-flight failed: {exc}")
        raise SystemExit(1) from None
    for note in verdict.notes:
        log.info("pre-flight: {note}", imml_event="preflight", note=note)
    for warning in verdict.warnings:
        log.warn("pre-flight: {warning}", imml_event="preflight-warning", warning=warning)
    if verdict.problems:
        for problem in verdict.problems:
            out(f"imml-mac: pre-flight failed: {problem}")
        raise SystemExit(1)
    return verdict


def build_service(
    options: ServiceOptions,
    reactor: Any,
    platform: str = sys.platform,
    env: Optional[Mapping[str, str]] = None,
    out: Callable[[str], object] = print,
    **supervision: Any,
) -> service.MultiService:
    """
    Pre-flight, then the service tree: caffeinate (or its skip line) and the
    supervised Immich ML.  C{supervision} overrides L{Supervisor} arguments
    (tests use it for short restart delays).
    """
    verdict = _preflight(options, out)
    pathlib.Path(options["cache"]).mkdir(parents=True, exist_ok=True)
    env = child_environment(
        os.environ if env is None else env,
        options["python"],
        options["host"],
        options["port"],
        options["cache"],
        verdict.providers,
        options.settings(),
    )
    top = service.MultiService()
    top.setName("imml-mac")
    sleep_guard(reactor, platform=platform, env=env, enabled=not options["allow-sleep"]).setServiceParent(top)
    probe = PingProbe(
        reactor,
        ping_url(options["host"], options["port"]),
        timeout=max(1.0, min(5.0, options["ping-interval"])),
    )
    arguments = dict(
        name="immich-ml",
        probe=probe,
        restart_delay=backoffPolicy(initialDelay=1.0, maxDelay=60.0, factor=2.0),
        ping_interval=options["ping-interval"],
        ping_failures=options["ping-failures"],
        start_timeout=options["start-timeout"],
        stop_timeout=options["stop-timeout"],
    )
    arguments.update(supervision)
    command = Command((options["python"], "-m", "immich_ml"), env=env, cwd=str(options["ml_dir"]))
    supervisor = Supervisor(reactor, command, **arguments)
    supervisor.setServiceParent(top)
    if not options["no-advertise"]:
        bonjour = advertiser(reactor, options["advertise-name"], options["host"], options["port"], verdict.providers)
        if bonjour is not None:
            supervisor.watch_readiness(bonjour.readiness)
            # (Started after the supervisor, stopped before it: withdrawn
            # before Immich ML stops.)
            bonjour.setServiceParent(top)
    log.info(
        "imml-mac: Immich ML from {ml_dir} on {host}:{port}, providers {providers}",
        imml_event="service-configured",
        ml_dir=str(options["ml_dir"]),
        host=options["host"],
        port=options["port"],
        providers=list(verdict.providers),
    )
    return top


def run_command(
    name: str, options: usage.Options, out: Callable[[str], object] = print, platform: str = sys.platform
) -> int:
    """
    Run C{setup}, C{doctor} or C{launchagent}; returns the exit status.
    """
    if name == "setup":
        plan = options.plan()
        try:
            done = install.run_setup(plan, out=out)
        except install.SetupError as exc:
            out(f"imml-mac setup FAILED: {exc}")
            return 1
        out("")
        out("Done:")
        for item in done:
            out(f"  - {item}")
        out("")
        out("Pre-flight in the new environment:")
        interpreter = Interpreter(
            str(plan.venv_python),
            str(plan.ml_dir),
            child_environment(os.environ, str(plan.venv_python), "0.0.0.0", 3003, plan.cache, None),
        )
        try:
            verdict = assess(interpreter.ask("facts"))
        except ProbeError as exc:
            out(f"  FAIL  {exc}")
            return 1
        for line in report_lines(verdict, []):
            out(line)
        if verdict.problems:
            return 1
        out("")
        out("Next: check Core ML and the providers, then start the service:")
        out(f"  twistd -n imml-mac doctor --immich {plan.target}")
        out(f"  twistd -n --pidfile= imml-mac --immich {plan.target}")
        return 0
    if name == "doctor":
        return run_doctor(options.interpreter(), options["providers"], out=out)
    if name == "launchagent":
        launchagent.write_agent(
            options.arguments(),
            pathlib.Path.home(),
            options["port"],
            label=options["label"],
            out=out,
            platform=platform,
        )
        return 0
    raise usage.UsageError(f"unknown command {name}")


def makeService(options: Options, reactor: Any = None) -> service.MultiService:
    if options.subCommand:
        raise SystemExit(run_command(options.subCommand, options.subOptions))
    if reactor is None:
        from twisted.internet import reactor
    return build_service(options, reactor)


def main(argv: Optional[Sequence[str]] = None, program: str = "imml-mac") -> int:
    """
    The ``imml-mac`` console script: the commands run here; without a
    command, twistd runs the service in the foreground.

    @param program: how the user called it, for the usage lines.
    """
    argv = sys.argv[1:] if argv is None else argv
    options = Options()
    options.program = program
    try:
        options.parseOptions(argv)
    except usage.UsageError as exc:
        print(f"{options}\nimml-mac: {exc}", file=sys.stderr)
        return 2
    if options.subCommand:
        return run_command(options.subCommand, options.subOptions)
    twistd = launchagent.twistd_path()
    os.execv(twistd, [twistd, "-n", "--pidfile=", "imml-mac", *argv])
