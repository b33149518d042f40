"""
A fake Immich ML host: its capacity, its timing, its failure modes.

L{FakeMLHost} models what a balancer sees of a real host: a bounded number of
slots, per-task service times, models that load on first use and unload when
idle, and switchable failures.  It owns its state and counters; what it says
over HTTP is L{imml.testing.fakesite}'s job.  It serves on a real port
(L{FakeMLHost.listen}), as a resource (L{FakeMLHost.resource}, for treq's
C{StubTreq}) or behind L{imml.testing.MemoryAgent}.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Mapping
from typing import Any

from attrs import Attribute, define, field, validators
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IDelayedCall, IListeningPort, IReactorTime, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from .answers import KNOWN_MODELS, VECTORS
from .cpu import CPUProfile, SharedCPU, Work
from .fakesite import JSON, FakeMLResource, FakeMLSite, Received, hang_up

__all__ = ["MODES", "FakeMLHost"]

log = Logger()

MODES: tuple[str, ...] = (
    "ok",
    "error500",
    "error503",
    "hang",
    "die-mid-answer",
    "reset",
    "ping-fail",
    "drop-upload",
)
"""The values L{FakeMLHost.mode} accepts."""


_QUEUED, _RUNNING, _DONE = "queued", "running", "done"


@define(eq=False)
class _Job:
    """A valid /predict waiting for or occupying a slot."""

    request: Request
    task: str
    models: tuple[str, ...]
    answer: bytes
    die: bool
    state: str = _QUEUED
    call: IDelayedCall | None = None
    work: Work | None = None


def _check_mode(instance: object, attribute: Attribute[str], value: str) -> None:
    if value not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {value!r}")


def _check_vectors(instance: object, attribute: Attribute[str], value: str) -> None:
    if value not in VECTORS:
        raise ValueError(f"vectors must be one of {VECTORS}, not {value!r}")


@define(eq=False)
class FakeMLHost:
    """
    A fake Immich ML host.

    Every answer carries C{X-Fake-Host: <name>}.  Valid C{/predict}
    requests take a slot for C{service_time} seconds (plus C{cold_start} the
    first time a model is used); requests beyond C{slots} wait in FIFO order.
    Error answers and the answers to C{/} and C{/ping} are immediate.

    With a C{cpu} profile the host is not a set of slots but a processor
    shared by the requests running on it, as a real host is
    (L{imml.testing.cpu}): each request's Python work and inference, scaled
    by its task's C{cost} and a random factor within C{jitter}, take as long
    as the cores shared with the others allow.

    C{mode} and C{failing_tasks} may be changed at any time; they apply to
    requests that arrive afterwards:

        - C{"ok"}: normal service;
        - C{"error500"} / C{"error503"}: C{/predict} answers 500 (plain text
          C{Internal Server Error}) / 503 at once;
        - C{"hang"}: every request is accepted and never answered;
        - C{"die-mid-answer"}: C{/predict} is processed, then the status line,
          headers and half the body are sent and the connection is closed
          (as by a process that dies);
        - C{"reset"}: the connection is aborted as soon as a C{/predict}
          arrives;
        - C{"ping-fail"}: C{/ping} answers 503, C{/predict} works;
        - C{"drop-upload"}: the connection is aborted once half of a
          request's body has arrived (a host that dies while a picture is
          being sent to it); nothing is received.

    @ivar reactor: Provides C{callLater} and C{seconds} (a L{task.Clock} in
        tests); L{listen} needs a real reactor.
    @ivar service_time: Seconds a request occupies a slot: one number for
        every task, or a mapping task key -> seconds (key C{"*"} for the
        rest, else 0).
    @ivar cpu: The host's processor and model (L{imml.testing.cpu.LIGHT},
        L{imml.testing.cpu.HEAVY}, or a L{CPUProfile} of your own), or
        L{None} for slots.
    @ivar cost: With C{cpu}, each task's work relative to a CLIP image
        (key C{"*"} for the rest, else 1).
    @ivar jitter: With C{cpu}, each request's work is scaled by a random
        factor between M{1 - jitter} and M{1 + jitter}.
    @ivar seed: Seeds that random factor.
    @ivar required_headers: Header name to value that every request must
        carry, as an authenticating proxy in front of a host demands; a
        request without them is answered 401 (and not counted).
    @ivar models: Model names that load; others answer 500.
    @ivar failing_tasks: Task keys whose model fails to load (500).
    @ivar vectors: What its embeddings are like (L{imml.testing.VECTORS}):
        C{"exact"} (every such host agrees), C{"fp16"} (rounded, still
        agreeing), C{"other-model"} or C{"wrong-shape"} (disagreeing).  May
        be changed at any time.
    @ivar model_ttl: Seconds a model may stay unused before it is unloaded
        (the host turns cold again), or L{None} for never.
    @ivar keepalive_timeout: Idle seconds before a connection is closed (the
        real service: 2), or L{None}.
    @ivar received: Every C{/predict} received, in order.
    @ivar in_flight: Requests occupying a slot now.
    @ivar max_in_flight: Peak of C{in_flight}.
    @ivar served: C{/predict} answered 200 (a C{die-mid-answer} is not).
    @ivar pings: C{/ping} requests received.
    @ivar cancelled: Requests whose client went away before the answer.
    @ivar dropped: Uploads cut halfway (mode C{drop-upload}).
    @ivar cold_starts: Model loads (each paid C{cold_start}).
    @ivar connections: Connections accepted, by L{listen}'s port or from a
        L{imml.testing.MemoryAgent}.
    @ivar port: The listening port number, once L{listen} has fired.
    @ivar address: C{"127.0.0.1:PORT"}, once L{listen} has fired.
    """

    reactor: IReactorTime
    name: str = "fake-ml"
    slots: int = field(default=1000, validator=validators.ge(1))
    service_time: float | Mapping[str, float] = 0.0
    cold_start: float = 0.0
    mode: str = field(default="ok", validator=_check_mode)
    failing_tasks: set[str] = field(factory=set, converter=set)
    vectors: str = field(default="exact", validator=_check_vectors)
    models: frozenset[str] = KNOWN_MODELS
    model_ttl: float | None = None
    keepalive_timeout: float | None = 2.0
    cpu: CPUProfile | None = None
    cost: Mapping[str, float] = field(factory=lambda: {"clip-textual": 0.2, "*": 1.0})
    jitter: float = field(default=0.5, validator=[validators.ge(0), validators.lt(1)])
    seed: int | None = 0
    required_headers: Mapping[str, str] = field(factory=dict)

    received: list[Received] = field(init=False, factory=list)
    in_flight: int = field(init=False, default=0)
    max_in_flight: int = field(init=False, default=0)
    served: int = field(init=False, default=0)
    pings: int = field(init=False, default=0)
    cancelled: int = field(init=False, default=0)
    dropped: int = field(init=False, default=0)
    cold_starts: int = field(init=False, default=0)
    connections: int = field(init=False, default=0)
    port: int | None = field(init=False, default=None)
    address: str | None = field(init=False, default=None)

    _queue: deque[_Job] = field(init=False, factory=deque)
    _running: set[_Job] = field(init=False, factory=set)
    _parked: set[Request] = field(init=False, factory=set)
    _draining: bool = field(init=False, default=False)
    _ready_at: dict[str, float] = field(init=False, factory=dict)
    _last_used: dict[str, float] = field(init=False, factory=dict)
    _listening: IListeningPort | None = field(init=False, default=None)
    _channels: set[HTTPChannel] = field(init=False, factory=set)
    _all_closed: list[Deferred[None]] = field(init=False, factory=list)
    _resource: Resource | None = field(init=False, default=None)
    _shared: SharedCPU | None = field(init=False, default=None)
    _random: random.Random = field(init=False)

    @_random.default
    def _make_random(self) -> random.Random:
        return random.Random(self.seed)

    def __attrs_post_init__(self) -> None:
        if self.cpu is not None:
            self._shared = SharedCPU(self.reactor, self.cpu)

    # ---- public API -------------------------------------------------------

    @property
    def queued(self) -> int:
        """Requests waiting for a slot."""
        return len(self._queue)

    @property
    def url(self) -> str:
        """C{http://address}, once L{listen} has fired."""
        if self.address is None:
            raise RuntimeError(f"{self.name} is not listening")
        return f"http://{self.address}"

    def resource(self) -> Resource:
        """The host as a L{twisted.web.resource.IResource} (one per host)."""
        if self._resource is None:
            self._resource = FakeMLResource(self)
        return self._resource

    def unload_models(self) -> None:
        """Forget every loaded model: the next requests pay C{cold_start}."""
        self._ready_at.clear()
        self._last_used.clear()

    def listen(
        self, endpoint_string: str | IStreamServerEndpoint = "tcp:0:interface=127.0.0.1"
    ) -> Deferred[IListeningPort]:
        """
        Serve on a server endpoint; sets L{port} and L{address} when bound.

        @param endpoint_string: A L{serverFromString} description, or an
            endpoint (an L{SSL4ServerEndpoint} with TLS options of your
            own: a host that demands a client certificate).
        @return: A Deferred firing with the L{IListeningPort}.
        """
        if self._listening is not None:
            raise RuntimeError(f"{self.name} is already listening")
        endpoint = (
            serverFromString(self.reactor, endpoint_string) if isinstance(endpoint_string, str) else endpoint_string
        )

        def bound(listening: IListeningPort) -> IListeningPort:
            self._listening = listening
            where = listening.getHost()
            self.port = getattr(where, "port", None)
            host = getattr(where, "host", None)
            self.address = f"{host}:{self.port}" if host is not None else str(where)
            log.info("fake ML host {name} listening on {address}", name=self.name, address=self.address)
            return listening

        return endpoint.listen(FakeMLSite(self)).addCallback(bound)

    def stop(self) -> Deferred[None]:
        """
        Stop listening, abort every open connection and drop every pending
        request.

        @return: A Deferred firing when the port is closed and every
            connection is gone (for in-memory connections: once the
            L{imml.testing.MemoryAgent} is flushed).
        """
        waits: list[Deferred[Any]] = []
        if self._listening is not None:
            waits.append(maybeDeferred(self._listening.stopListening))
            self._listening = None
        if self._channels:
            gone: Deferred[None] = Deferred()
            self._all_closed.append(gone)
            waits.append(gone)
            for channel in list(self._channels):
                channel.transport.abortConnection()
        for job in list(self._running):
            if job.call is not None and job.call.active():
                job.call.cancel()
        return gatherResults(waits, consumeErrors=True).addCallback(lambda _: None)

    # ---- what the web face reports (see fakesite) ----------------------------

    def _pinged(self) -> None:
        self.pings += 1

    def _arrived(self, received: Received) -> None:
        """Record a C{/predict}, valid or not."""
        self.received.append(received)

    def _dropped(self) -> None:
        self.dropped += 1

    def _park(self, request: Request) -> object:
        """Accept a request and never answer it (mode C{hang})."""
        self._parked.add(request)

        def gone(failure: Failure) -> None:
            self._parked.discard(request)
            self.cancelled += 1

        request.notifyFinish().addErrback(gone)
        return NOT_DONE_YET

    def _submit(self, request: Request, task: str, models: tuple[str, ...], answer: bytes, die: bool) -> None:
        """Take a valid C{/predict}: into a free slot, or into the queue."""
        job = _Job(request, task, models, answer, die)
        request.notifyFinish().addErrback(self._client_gone, job)
        if self.in_flight < self.slots and not self._queue:
            self._start(job)
        else:
            self._queue.append(job)

    # ---- slots, service times, cold starts --------------------------------

    def _service_seconds(self, task: str) -> float:
        times = self.service_time
        if isinstance(times, (int, float)):
            return float(times)
        default = times.get("*", 0.0)
        return sum(times.get(key, default) for key in task.split("+"))

    def _load_wait(self, models: tuple[str, ...], now: float) -> float:
        """Seconds until every model of a request is loaded; loads the cold ones."""
        wait = 0.0
        ttl = self.model_ttl
        for model in models:
            ready = self._ready_at.get(model)
            if ready is not None and ttl is not None and ready <= now:
                if now - self._last_used.get(model, ready) > ttl:
                    ready = None
            if ready is None:
                ready = self._ready_at[model] = now + self.cold_start
                self.cold_starts += 1
            wait = max(wait, ready - now)
        return wait

    def _start(self, job: _Job) -> None:
        job.state = _RUNNING
        self._running.add(job)
        self.in_flight += 1
        if self.in_flight > self.max_in_flight:
            self.max_in_flight = self.in_flight
        now = self.reactor.seconds()
        load = self._load_wait(job.models, now)
        if self._shared is not None:
            if load > 0:
                job.call = self.reactor.callLater(load, self._compute, job)
            else:
                self._compute(job)
            return
        delay = self._service_seconds(job.task) + load
        if delay > 0:
            job.call = self.reactor.callLater(delay, self._finish, job)
        else:
            self._finish(job)

    def _compute(self, job: _Job) -> None:
        """Put a request's work on the shared processor."""
        job.call = None
        cpu, cost, jitter = self.cpu, self.cost, self.jitter
        scale = 0.0
        for key in job.task.split("+"):
            scale += cost.get(key, cost.get("*", 1.0))
        uniform = self._random.uniform
        python = cpu.python * scale * uniform(1 - jitter, 1 + jitter)
        inference = cpu.inference * scale * uniform(1 - jitter, 1 + jitter)
        job.work = self._shared.submit(python, inference, lambda: self._finish(job))

    def _release(self, job: _Job) -> None:
        job.state = _DONE
        self._running.discard(job)
        self.in_flight -= 1
        now = self.reactor.seconds()
        for model in job.models:
            self._last_used[model] = now

    def _finish(self, job: _Job) -> None:
        self._release(job)
        request = job.request
        request.setResponseCode(200)
        request.setHeader(b"content-type", JSON)
        request.setHeader(b"content-length", b"%d" % len(job.answer))
        if job.die:
            request.write(job.answer[: len(job.answer) // 2])
            hang_up(request)
        else:
            request.write(job.answer)
            request.finish()
            self.served += 1
        self._drain()

    def _drain(self) -> None:
        """Start queued requests while slots are free (iteratively)."""
        if self._draining:
            return
        self._draining = True
        try:
            while self._queue and self.in_flight < self.slots:
                self._start(self._queue.popleft())
        finally:
            self._draining = False

    def _client_gone(self, failure: Failure, job: _Job) -> None:
        if job.state == _QUEUED:
            self._queue.remove(job)
        elif job.state == _RUNNING:
            if job.call is not None and job.call.active():
                job.call.cancel()
            if job.work is not None:
                self._shared.cancel(job.work)
            job.state = _DONE
            self._running.discard(job)
            self.in_flight -= 1
            self._drain()
        else:
            return
        job.state = _DONE
        self.cancelled += 1

    # ---- connection tracking (for stop) ------------------------------------

    def _connected(self, channel: HTTPChannel) -> None:
        self.connections += 1
        self._channels.add(channel)

    def _disconnected(self, channel: HTTPChannel) -> None:
        self._channels.discard(channel)
        if not self._channels:
            waiting, self._all_closed = self._all_closed, []
            for d in waiting:
                d.callback(None)
