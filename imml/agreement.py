"""
The agreement check: hosts that answer the same question must give the same
answer, or they are kept away from Immich.

Immich stores the vectors it receives (CLIP embeddings for smart search,
face embeddings for people) and compares them with each other forever; a
host with another model, other model files or a broken accelerator gives
vectors that compare with nothing, and spoils a library silently.  So, for
each embedding task and model that requests ask for (L{CANARY_TASKS}),
L{Agreement} sends a fixed input (L{imml.canaries}) to every host that
serves the task and judges their answers:

- the first request of a task and model starts a I{round}: canaries go to
  every host up that serves the task, at once, and no host serves the task
  until the round is judged: when every host has answered, or after
  C{wait} seconds with the answers in by then (a host that answers later
  is judged then, and serves only after).  A host alone has nothing to be
  compared with: it serves at once (its answer is kept for the hosts that
  come);
- a host agrees when its answer has the shape of the leader's and its
  vectors are at least the task's threshold alike (cosine similarity).  The
  leader is a host marked C{reference = true}, else the host agreeing with
  the most others; between groups as large, the one that served the task
  first (and the balancer says so loudly: it cannot tell which is right);
- a host that joins, or comes back after being down, is checked before it
  serves the task; each host is checked again every C{interval} seconds;
- a host whose canary fails (an error, a timeout) is not judged: errors are
  the retries' business, and it is checked again sooner (L{RETRY}).

Each host's check of each model is one L{Verdict}; a host serves the task
while its verdict is in L{SERVES}.  The dispatcher asks L{Agreement.admits}
for every candidate; the status page, C{/api/status} and C{/metrics} read
L{Agreement.views}.  Canaries do not count in a host's slots or statistics.
"""

from __future__ import annotations

from collections import Counter
from enum import Enum
from typing import Any, Optional

from attrs import define, field
from twisted.internet.defer import Deferred, FirstError, gatherResults
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer

from . import canaries
from .body import BytesProducer
from .canaries import CANARY_TASKS, Comparison, Reading, Unreadable, compare
from .classify import RequestInfo
from .fleet import Backend, Fleet
from .health import describe_failure
from .upstream import Answer, Discard, Upstream, with_extra

#: Cosine similarity a host's canary vectors must reach, by default for
#: every task.  Rounding (fp16, Core ML) stays above 0.9999.
THRESHOLD = 0.99
#: Seconds between two checks of a host, by default.
INTERVAL = 1800.0
#: Seconds the first request of a task waits for the first round's answers.
WAIT = 10.0
#: Seconds a host has to answer a canary (it may have a model to load).
TIMEOUT = 120.0
#: Seconds after which a canary that failed is sent again (or the interval,
#: if shorter).
RETRY = 60.0
#: Most models checked at once: requests for more are not held back.
MAX_MODELS = 32


class Verdict(Enum):
    #: Not judged yet: it serves nothing of the model.
    PENDING = "pending"
    AGREES = "agrees"
    DISAGREES = "disagrees"
    #: Its canary got no usable answer (an error, a timeout): not judged,
    #: it serves, and is checked again soon.
    FAILED = "failed"


#: The verdicts under which a host serves the task.
SERVES = frozenset({Verdict.AGREES, Verdict.FAILED})


@define(eq=False)
class _Body:
    """
    A canary's body, as L{Upstream.exchange} reads one.
    """

    data: bytes

    @property
    def length(self) -> int:
        return len(self.data)

    def producer(self) -> IBodyProducer:
        return BytesProducer(self.data)


@define(eq=False)
class HostCheck:
    """
    One host's check of one model.

    @ivar since: when it got its verdict.
    @ivar reading: its last answer to the canary, read.
    @ivar similarity: the cosine similarity of its vectors to those of the
        host it was compared with (None: no vectors to compare).
    @ivar compared_with: the host its answer was compared with.
    @ivar reason: why it has its verdict, in words.
    @ivar checked: when its last canary answer came.
    @ivar serving_since: when it last began to agree (the host that served
        a task first keeps it when two disagree).
    @ivar stale: it was down since its verdict: checked again before it
        serves.
    @ivar asking: a canary is on its way to it (or about to be sent).
    @ivar sending: what its canary requests under way fire with (cancelled
        when it is forgotten).
    @ivar timer: when it is checked next.
    """

    since: float
    verdict: Verdict = Verdict.PENDING
    reading: Optional[Reading] = None
    similarity: Optional[float] = None
    compared_with: Optional[str] = None
    reason: str = "not checked yet"
    checked: Optional[float] = None
    serving_since: float = float("inf")
    stale: bool = False
    asking: bool = False
    sending: Optional[Deferred] = None
    timer: Optional[IDelayedCall] = None


@define(eq=False)
class ModelCheck:
    """
    The checks of one task and model (one C{entries} of requests).

    @ivar judged: its first round is over: each answer is judged as it comes.
    @ivar conflict: while two groups of hosts as large disagree, what was
        said of it.
    """

    task: str
    entries: bytes
    model: str
    hosts: dict[Backend, HostCheck] = field(factory=dict)
    judged: bool = False
    round_timer: Optional[IDelayedCall] = None
    conflict: Optional[str] = None


def parse_thresholds(text: str) -> dict[str, float]:
    """
    C{--agreement-threshold}: one number for every task (C{0.99}), or
    C{TASK=NUMBER} pairs, comma separated, for some (C{faces=0.95}); the
    others keep L{THRESHOLD}.

    @raise ValueError: naming what is wrong.
    """
    thresholds = dict.fromkeys(CANARY_TASKS, THRESHOLD)
    text = text.strip()
    pairs = [p.strip() for p in text.split(",")] if "=" in text else [f"{t}={text}" for t in CANARY_TASKS]
    for pair in pairs:
        task, _, number = pair.partition("=")
        task = task.strip()
        if task not in thresholds:
            raise ValueError(f"{task!r} is not a checked task: {', '.join(CANARY_TASKS)}")
        try:
            value = float(number)
        except ValueError:
            raise ValueError(f"{number.strip()!r} is not a number") from None
        if not 0.0 < value <= 1.0:
            raise ValueError(f"a threshold is a similarity above 0 and at most 1, not {value:g}")
        thresholds[task] = value
    return thresholds


def parse_switch(text: str) -> bool:
    """
    C{--agreement}: on or off.
    """
    value = str(text).strip().lower()
    if value in ("on", "true", "yes", "1"):
        return True
    if value in ("off", "false", "no", "0"):
        return False
    raise ValueError(f"{text!r} is neither on nor off")


@define(eq=False)
class Agreement:
    """
    The agreement check of a fleet's hosts (see the module's description):
    the one writer of the checks' state.

    @ivar on: whether requests wait for the check (C{--agreement}).
    @ivar thresholds: per task, the similarity a host must reach.
    @ivar interval: seconds between two checks of a host.
    @ivar wait: seconds a first round waits for answers.
    @ivar timeout: seconds a host has to answer its canaries.
    @ivar sent: canary requests sent, per (host, task), for the hosts in the
        fleet.
    """

    fleet: Fleet
    upstream: Upstream
    clock: Any
    on: bool = True
    thresholds: dict[str, float] = field(factory=lambda: dict.fromkeys(CANARY_TASKS, THRESHOLD))
    interval: float = INTERVAL
    wait: float = WAIT
    timeout: float = TIMEOUT
    log: Logger = field(factory=lambda: Logger(namespace="imml.agreement"))
    sent: Counter = field(factory=Counter)
    _models: dict[tuple[str, bytes], ModelCheck] = field(factory=dict)
    _references: tuple = ()
    _scanning: bool = False
    _too_many: bool = False

    def __attrs_post_init__(self) -> None:
        self.fleet.when_hosts_change(self.scan)

    # -- settings -------------------------------------------------------------

    def set_on(self, on: bool) -> None:
        """
        Turn the check on or off; either way, it starts afresh.
        """
        self.stop()
        self.on = on
        self.fleet.changed(hosts=False)

    def set_thresholds(self, thresholds: dict[str, float]) -> None:
        self.thresholds = dict(thresholds)
        for model in list(self._models.values()):
            self._judge(model)

    def set_interval(self, seconds: float) -> None:
        """
        Seconds between two checks of a host, from each host's next check on.
        """
        self.interval = seconds

    def set_wait(self, seconds: float) -> None:
        self.wait = seconds

    def stop(self) -> None:
        """
        Forget every check: cancel the timers and the canaries under way.
        """
        models, self._models = self._models, {}
        self._references, self._too_many = (), False
        for model in models.values():
            if model.round_timer is not None and model.round_timer.active():
                model.round_timer.cancel()
            for check in model.hosts.values():
                self._forget(check)

    @staticmethod
    def _forget(check: HostCheck) -> None:
        if check.timer is not None and check.timer.active():
            check.timer.cancel()
        check.timer = None
        sending, check.sending = check.sending, None
        if sending is not None:
            sending.cancel()

    # -- what the dispatcher asks ---------------------------------------------

    def admits(self, backend: Backend, info: RequestInfo) -> bool:
        """
        Whether C{backend} may serve C{info} (a host the fleet finds usable
        for its task): yes unless its task and model are checked and the
        host has not agreed (yet).  The first request of a model starts its
        first round; a host not checked yet is checked now.
        """
        if not self.on or info.task not in CANARY_TASKS or info.entries is None:
            return True
        model = self._model(info.task, info.entries)
        if model is None:
            return True
        check = model.hosts.get(backend)
        if _unasked(check):
            self._ask(model, backend)
            return False
        return check.verdict in SERVES

    def why(self, info: RequestInfo) -> Optional[str]:
        """
        Why no host serves C{info}, when hosts up serve its task but none
        has agreed; None otherwise.
        """
        if not self.on or info.task not in CANARY_TASKS or info.entries is None:
            return None
        model = self._models.get((info.task, info.entries))
        if model is None:
            return None
        usable = [b for b in self.fleet.backends if b.usable_for(info.task)]
        checks = [model.hosts[b] for b in usable if b in model.hosts]
        if not usable or any(c.verdict in SERVES and not c.stale for c in checks):
            return None
        if any(c.verdict is Verdict.DISAGREES for c in checks):
            return f"every ML host up that serves {info.task} gives answers that disagree (see the status page)"
        return f"no ML host that serves {info.task} answered its agreement check"

    # -- the checks -------------------------------------------------------------

    def _model(self, task: str, entries: bytes) -> Optional[ModelCheck]:
        model = self._models.get((task, entries))
        if model is not None:
            return model
        name = canaries.model_of(task, entries)
        if name is None:
            return None
        if len(self._models) >= MAX_MODELS:
            if not self._too_many:
                self._too_many = True
                self.log.warn(
                    "{count} models are checked already: requests for more are not checked",
                    count=len(self._models),
                    imml_event="agreement-full",
                )
            return None
        model = self._models[(task, entries)] = ModelCheck(task, entries, name)
        model.round_timer = self.clock.callLater(self.wait, self._close_round, model)
        self.log.info(
            "checking that the ML hosts agree on {task} ({model})",
            task=task,
            model=name,
            imml_event="agreement-round",
        )
        usable = [b for b in self.fleet.backends if b.usable_for(task)]
        for backend in usable:
            self._ask(model, backend)
        if len(usable) == 1:
            # Nothing to compare it with: it serves at once; its answer is
            # kept, for the hosts that come.
            [alone] = usable
            self._close_round(model)
            self._set(model, alone, model.hosts[alone], Verdict.AGREES, Comparison(True, None, "nothing to compare"))
        return model

    def _ask(self, model: ModelCheck, backend: Backend) -> None:
        """
        Send C{model}'s canary to C{backend} (on the reactor's next turn),
        unless one is on its way.
        """
        check = model.hosts.get(backend)
        now = self.clock.seconds()
        if check is None:
            check = model.hosts[backend] = HostCheck(since=now)
        if check.stale:
            # Its last answer may no longer be its answer (re-imaged?).
            check.stale, check.reading = False, None
            if check.verdict is not Verdict.PENDING:
                self._set(model, backend, check, Verdict.PENDING, Comparison(False, None, "it was down: checked again"))
        if not check.asking:
            check.asking = True
            self.clock.callLater(0, self._send, model, backend)

    def _send(self, model: ModelCheck, backend: Backend) -> None:
        check = model.hosts.get(backend)
        if check is None or self._current(model, backend) is not check:
            return  # forgotten meanwhile
        if not backend.usable_for(model.task):
            check.asking = False  # asked again once usable (scan)
            self._judge_or_wait(model)
            return
        try:
            tries = self._canaries(model, backend)
        except Exception as e:
            # Not a verdict on its answers: it serves as after a failed
            # canary, and is asked again soon.
            self.log.failure("the agreement check of {backend} could not be sent", backend=backend.name)
            check.asking = False
            self._could_not(model, backend, check, f"it could not be sent ({type(e).__name__})")
            return
        d = check.sending = gatherResults(tries, consumeErrors=True)
        d.addTimeout(self.timeout, self.clock)
        d.addCallbacks(self._answered, self._failed, callbackArgs=(model, backend), errbackArgs=(model, backend))
        d.addErrback(lambda f: self.log.failure("the agreement check of {backend} failed", f, backend=backend.name))

    def _canaries(self, model: ModelCheck, backend: Backend) -> list[Deferred]:
        """
        Send C{model}'s canary requests to C{backend}: what each fires with.
        When one cannot be sent, those sent are cancelled and the error is
        raised.
        """
        tries: list[Deferred] = []
        try:
            for image, text in canaries.inputs(model.task):
                content_type, data = canaries.body(model.entries, image, text)
                headers = Headers({b"content-type": [content_type], b"x-imml-canary": [model.task.encode("ascii")]})
                if backend.settings.headers:
                    # As its requests and its health checks: a host behind an
                    # authenticating proxy needs its headers.
                    headers = with_extra(headers, backend.settings.headers)
                self.sent[(backend.name, model.task)] += 1
                tries.append(
                    self.upstream.exchange(
                        b"POST", backend.address.url(b"/predict"), headers, _Body(data), lambda answer: Discard()
                    )
                )
        except Exception:
            for sent in tries:
                sent.addErrback(lambda f: None)
                sent.cancel()
            raise
        return tries

    def _current(self, model: ModelCheck, backend: Backend) -> Optional[HostCheck]:
        """
        C{backend}'s check of C{model}, unless either was forgotten since.
        """
        if self._models.get((model.task, model.entries)) is not model:
            return None
        return model.hosts.get(backend)

    def _answered(self, answers: list[Answer], model: ModelCheck, backend: Backend) -> None:
        check = self._current(model, backend)
        if check is None:
            return
        check.asking, check.sending = False, None
        for answer in answers:
            if answer.committed or not 200 <= answer.code < 300:
                self._could_not(model, backend, check, "too large" if answer.committed else f"status {answer.code}")
                return
        check.checked = self.clock.seconds()
        self._schedule(model, backend, check, self.interval)
        try:
            check.reading = canaries.read(model.task, [b"".join(a.chunks) for a in answers])
        except Unreadable as e:
            check.reading = None
            if self._set(model, backend, check, Verdict.DISAGREES, Comparison(False, None, f"its answer: {e}")):
                self.fleet.changed(hosts=False)
        self._judge_or_wait(model)

    def _failed(self, failure: Failure, model: ModelCheck, backend: Backend) -> None:
        check = self._current(model, backend)
        if check is None:
            return  # forgotten: cancelled on purpose
        check.asking, check.sending = False, None
        error = failure.value.subFailure.value if failure.check(FirstError) else failure.value
        self._could_not(model, backend, check, describe_failure(error))

    def _could_not(self, model: ModelCheck, backend: Backend, check: HostCheck, why: str) -> None:
        """
        C{backend}'s canary got no usable answer, for reason C{why}: not a
        verdict on its vectors.  A host not judged yet serves, unjudged (its
        errors are the retries' business); one judged keeps its verdict.  It
        is asked again soon.
        """
        delay = min(RETRY, self.interval)
        self._schedule(model, backend, check, delay)
        check.reason = f"no answer to its last check: {why}"
        was = check.verdict
        if was is Verdict.PENDING:
            check.verdict, check.since = Verdict.FAILED, self.clock.seconds()
        self.log.warn(
            "ML host {backend} gave no answer to the agreement check on {task} ({model}): {why}; {what}, "
            "checked again in {delay:g} s",
            backend=backend.name,
            task=model.task,
            model=model.model,
            why=why,
            what=f"it serves {model.task} unjudged" if was is Verdict.PENDING else f"it still {was.value}",
            delay=delay,
            verdict=check.verdict.value,
            was=was.value,
            changed=was is not check.verdict,
            imml_event="agreement",
        )
        self._judge_or_wait(model)
        if was is not check.verdict:
            self.fleet.changed(hosts=False)

    def _schedule(self, model: ModelCheck, backend: Backend, check: HostCheck, delay: float) -> None:
        if check.timer is not None and check.timer.active():
            check.timer.cancel()
        check.timer = self.clock.callLater(delay, self._again, model, backend)

    def _again(self, model: ModelCheck, backend: Backend) -> None:
        check = model.hosts.get(backend)
        if check is None:
            return
        check.timer = None
        if backend.usable_for(model.task):
            self._ask(model, backend)
        else:
            self._schedule(model, backend, check, self.interval)

    # -- judging --------------------------------------------------------------

    def _judge_or_wait(self, model: ModelCheck) -> None:
        if not model.judged and any(c.asking for c in model.hosts.values()):
            return  # the first round waits for its other answers
        self._close_round(model)

    def _close_round(self, model: ModelCheck) -> None:
        if model.round_timer is not None and model.round_timer.active():
            model.round_timer.cancel()
        model.round_timer = None
        model.judged = True
        self._judge(model)

    def _judge(self, model: ModelCheck) -> None:
        """
        Judge every host of C{model} that has answered, against the leader.
        """
        if not model.judged:
            return
        hosts = model.hosts
        present = [b for b in self.fleet.backends if b in hosts and hosts[b].reading is not None]
        if not present:
            return
        threshold = self.thresholds.get(model.task, THRESHOLD)
        cache: dict[tuple[int, int], Comparison] = {}

        def versus(a: Backend, b: Backend) -> Comparison:
            key = (id(a), id(b))
            if key not in cache:
                cache[key] = compare(hosts[a].reading, hosts[b].reading, threshold)
            return cache[key]

        groups = {a: [b for b in present if b is a or versus(a, b).agrees] for a in present}

        def seniority(b: Backend) -> float:
            check = hosts[b]
            return check.serving_since if check.verdict is Verdict.AGREES else float("inf")

        references = [b for b in present if b.settings.reference]
        if references:
            leader = references[0]
        else:
            leader = max(
                present,
                key=lambda a: (len(groups[a]), -min(seniority(b) for b in groups[a]), -seniority(a), -a.index),
            )
        changed = False
        for backend in present:
            check = hosts[backend]
            if backend is leader:
                others = [b for b in groups[leader] if b is not leader]
                best = max(others, key=lambda b: versus(leader, b).similarity or 0.0, default=None)
                comparison = versus(leader, best) if best is not None else Comparison(True, None, "nothing to compare")
                if backend.settings.reference:
                    comparison = Comparison(True, comparison.similarity, "the reference")
                verdict, against = Verdict.AGREES, best
            else:
                comparison = versus(backend, leader)
                verdict = Verdict.AGREES if comparison.agrees else Verdict.DISAGREES
                against = leader
            changed |= self._set(model, backend, check, verdict, comparison, against)
        self._conflict(model, leader, groups, references)
        if changed:
            self.fleet.changed(hosts=False)

    def _conflict(self, model: ModelCheck, leader: Backend, groups: dict, references: list) -> None:
        """
        Say so, loudly, when a group of hosts as large as the leader's
        disagrees with it and no host is the reference: the one that served
        the task first keeps it, and the balancer cannot tell which is right.
        """
        size = len(groups[leader])
        rivals = [b for b in groups if b not in groups[leader] and len(groups[b]) >= size]
        if references or not rivals:
            model.conflict = None
            return
        held = ", ".join(b.name for b in rivals)
        text = (
            f"ML hosts {leader.name} and {held} give different answers for {model.task} ({model.model}) "
            f"and no host marked reference = true has answered: {leader.name}, which served it first, keeps it; "
            f"{held} serves none of it. Check {held}'s image, accelerator and model files "
            "(docs/agreement.md), or mark the right host reference = true"
        )
        if text != model.conflict:
            model.conflict = text
            self.log.error("{text}", text=text, task=model.task, model=model.model, imml_event="agreement-conflict")

    def _set(
        self,
        model: ModelCheck,
        backend: Backend,
        check: HostCheck,
        verdict: Verdict,
        comparison: Comparison,
        against: Optional[Backend] = None,
    ) -> bool:
        """
        Give C{backend} its C{verdict} on C{model}, and log it if it is a
        new one; whether that changed whether it serves the task.
        """
        now = self.clock.seconds()
        was = check.verdict
        if verdict is not was:
            check.since = now
            if verdict is Verdict.AGREES:
                check.serving_since = now
        check.verdict = verdict
        check.reason = comparison.reason
        if verdict in (Verdict.AGREES, Verdict.DISAGREES):
            check.similarity = comparison.similarity
            check.compared_with = against.name if against is not None else None
        if verdict is was:
            return False  # (every answer judges every host: said once is enough)
        loud = verdict is Verdict.DISAGREES or was is Verdict.AGREES
        (self.log.warn if loud else self.log.info)(
            "ML host {backend} {verdict} on {task} ({model}){against}: {reason}{change}",
            backend=backend.name,
            verdict=verdict.value,
            was=was.value,
            changed=True,
            task=model.task,
            model=model.model,
            similarity=check.similarity,
            compared_with=check.compared_with,
            against=f" with {against.name}" if against is not None and against is not backend else "",
            reason=comparison.reason,
            change=_change(model.task, was, verdict),
            imml_event="agreement",
        )
        return (was in SERVES) != (verdict in SERVES)

    # -- following the fleet --------------------------------------------------

    def scan(self) -> None:
        """
        The fleet changed: check hosts that joined or came back up, forget
        those that left (and their canaries' count), mark those that went
        down for a new check, and judge again when hosts left or the
        reference hosts changed (a first round that waited only for hosts
        that left is over).
        """
        # The canaries of hosts that left are no longer counted (a DNS
        # pool's addresses come and go).
        names = {b.name for b in self.fleet.backends}
        for key in [k for k in self.sent if k[0] not in names]:
            del self.sent[key]
        if not self.on or self._scanning or not self._models:
            return
        self._scanning = True
        try:
            backends = self.fleet.backends
            present = set(backends)
            references = tuple(b for b in backends if b.settings.reference)
            again, self._references = references != self._references, references
            for model in list(self._models.values()):
                for backend in [b for b in model.hosts if b not in present]:
                    self._forget(model.hosts.pop(backend))
                    again = True
                for backend in backends:
                    check = model.hosts.get(backend)
                    if backend.usable_for(model.task):
                        if _unasked(check):
                            self._ask(model, backend)
                    elif check is not None and not backend.health.up:
                        check.stale = True
                if again:
                    # A first round may have waited only for hosts that left.
                    self._judge_or_wait(model)
        finally:
            self._scanning = False

    # -- what is shown ----------------------------------------------------------

    def views(self, backend: Backend) -> list[dict]:
        """
        C{backend}'s checks, for the status page and C{/api/status}.
        """
        views = []
        for model in self._models.values():
            check = model.hosts.get(backend)
            if check is not None:
                views.append(
                    {
                        "task": model.task,
                        "model": model.model,
                        "verdict": check.verdict.value,
                        "similarity": check.similarity,
                        "compared_with": check.compared_with,
                        "reason": check.reason,
                        "since": check.since,
                        "checked": check.checked,
                        "stale": check.stale,
                    }
                )
        return views

    def conflicts(self) -> list[str]:
        """
        What needs an operator: hosts held out of a task because their
        answers disagree.
        """
        texts = []
        for model in self._models.values():
            if model.conflict is not None:
                texts.append(model.conflict)
                continue
            for backend, check in model.hosts.items():
                if check.verdict is Verdict.DISAGREES:
                    texts.append(
                        f"ML host {backend.name} gives answers for {model.task} ({model.model}) that disagree "
                        f"with those of {check.compared_with or 'the other hosts'} ({check.reason}): it serves none of "
                        f"{model.task}. Check its image, accelerator and model files (docs/agreement.md)"
                    )
        return texts


def _unasked(check: Optional[HostCheck]) -> bool:
    """
    Whether a host (with C{check}, or None) must be asked before it serves:
    never asked, back from down, or not judged and nothing on its way (it
    was not usable when its canary was to go).
    """
    return (
        check is None
        or check.stale
        or (check.verdict is Verdict.PENDING and not check.asking and check.reading is None)
    )


def _change(task: str, was: Verdict, verdict: Verdict) -> str:
    if verdict is Verdict.DISAGREES:
        return f"; it serves no {task} until it agrees"
    if verdict in SERVES and was not in SERVES:
        return f"; it serves {task}" + (" (not judged; checked again soon)" if verdict is Verdict.FAILED else "")
    if verdict is Verdict.PENDING:
        return f"; it serves no {task} until its answers are checked"
    return ""


__all__ = ["SERVES", "Agreement", "HostCheck", "ModelCheck", "Verdict", "parse_switch", "parse_thresholds"]
