"""
The command line of a fake host: C{python -m imml.testing}.

    python -m imml.testing --listen tcp:0:interface=127.0.0.1 --slots 2 \\
        --service-ms 40 --service-ms-task clip-textual=10
    python -m imml.testing --cpu light --cores 0.4     # a real-like host, a fifth of the speed
    python -m imml.testing --cpu light --cores 0.4 --period 0.1   # ... held to it as by a CPU quota

serves one L{FakeMLHost} on the global reactor, prints C{LISTENING host:port}
on standard output once bound, logs warnings to standard error and exits with
0 on SIGTERM or SIGINT (1 if it cannot listen).  Benchmarks and tests start
it as a child process, one per host.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Optional

from attrs import evolve
from twisted.python.failure import Failure

from .answers import TASKS, VECTORS
from .cpu import PROFILES, CPUProfile
from .fakehost import MODES, FakeMLHost

__all__ = ["main"]


def _task_ms(value: str) -> tuple[str, float]:
    task, equals, ms = value.partition("=")
    if not equals or task not in TASKS:
        raise argparse.ArgumentTypeError(f"expected TASK=MS with TASK in {', '.join(TASKS)}")
    return task, float(ms)


def _arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m imml.testing",
        description="Run a fake Immich ML host; prints 'LISTENING host:port' once bound.",
    )
    parser.add_argument("--listen", default="tcp:0:interface=127.0.0.1", help="server endpoint")
    parser.add_argument("--name", default="fake-ml", help="value of the X-Fake-Host header")
    parser.add_argument("--slots", type=int, default=1000, help="requests processed at once")
    parser.add_argument("--service-ms", type=float, default=0.0, help="milliseconds per request")
    parser.add_argument(
        "--service-ms-task",
        type=_task_ms,
        action="append",
        default=[],
        metavar="TASK=MS",
        help="milliseconds for one task (repeatable)",
    )
    parser.add_argument("--cold-ms", type=float, default=0.0, help="extra milliseconds on a model's first use")
    parser.add_argument("--model-ttl-s", type=float, default=None, help="unload a model idle this long")
    parser.add_argument("--keepalive-s", type=float, default=2.0, help="idle connection timeout")
    parser.add_argument("--mode", choices=MODES, default="ok")
    parser.add_argument("--failing-task", choices=TASKS, action="append", default=[])
    parser.add_argument(
        "--vectors", choices=VECTORS, default="exact", help="what its embeddings are like (another model's...)"
    )
    parser.add_argument(
        "--cpu",
        choices=sorted(PROFILES),
        default=None,
        help="a processor shared by the requests running (a real host), with this model, instead of slots",
    )
    parser.add_argument("--cores", type=float, default=None, help="with --cpu: cores the service may use")
    parser.add_argument(
        "--period",
        type=float,
        default=None,
        help="with --cpu and --cores: enforce the cores as a CPU quota does, per period of this many seconds "
        "(Linux's default is 0.1): full speed until the period's share is spent, then nothing until the next",
    )
    parser.add_argument("--threads", type=int, default=None, help="with --cpu: inferences at once")
    parser.add_argument("--jitter", type=float, default=0.5, help="with --cpu: each request's work varies by +-this")
    parser.add_argument("--seed", type=int, default=0, help="with --cpu: seed of that variation")
    args = parser.parse_args(argv)
    if args.cpu is None and (args.cores is not None or args.threads is not None):
        parser.error("--cores and --threads go with --cpu")
    if args.period is not None and (args.cores is None or args.period <= 0):
        parser.error("--period goes with --cpu and --cores, and is a number of seconds above 0")
    return args


def _profile(args: argparse.Namespace) -> Optional[CPUProfile]:
    """
    The processor the options describe, or None for slots.
    """
    if args.cpu is None:
        return None
    cpu = PROFILES[args.cpu]
    if args.cores is not None:
        cpu = evolve(cpu, cores=args.cores, period=args.period, machine=cpu.cores)
    if args.threads is not None:
        cpu = evolve(cpu, threads=args.threads)
    return cpu


def main(argv: Sequence[str] | None = None) -> int:
    """
    Serve one fake host on the global reactor until SIGTERM or SIGINT.

    @return: The exit code: 0 after a signal, 1 if the port could not be bound.
    """
    args = _arguments(argv)
    from twisted.internet import reactor
    from twisted.logger import (
        FilteringLogObserver,
        LogLevel,
        LogLevelFilterPredicate,
        globalLogBeginner,
        textFileLogObserver,
    )

    globalLogBeginner.beginLoggingTo(
        [
            FilteringLogObserver(
                textFileLogObserver(sys.stderr),
                [LogLevelFilterPredicate(defaultLogLevel=LogLevel.warn)],
            )
        ],
        redirectStandardIO=False,
    )
    times: dict[str, float] = {"*": args.service_ms / 1000}
    times.update((task, ms / 1000) for task, ms in args.service_ms_task)
    host = FakeMLHost(
        reactor,
        name=args.name,
        slots=args.slots,
        service_time=times,
        cold_start=args.cold_ms / 1000,
        mode=args.mode,
        failing_tasks=set(args.failing_task),
        vectors=args.vectors,
        model_ttl=args.model_ttl_s,
        keepalive_timeout=args.keepalive_s or None,
        cpu=_profile(args),
        jitter=args.jitter,
        seed=args.seed,
    )
    exit_code = [0]

    def listening(_: object) -> None:
        sys.stdout.write(f"LISTENING {host.address}\n")
        sys.stdout.flush()
        reactor.addSystemEventTrigger("before", "shutdown", host.stop)

    def failed(failure: Failure) -> None:
        sys.stderr.write(f"cannot listen on {args.listen}: {failure.getErrorMessage()}\n")
        exit_code[0] = 1
        reactor.stop()

    reactor.callWhenRunning(lambda: host.listen(args.listen).addCallbacks(listening, failed))
    reactor.run()
    return exit_code[0]
