"""
The agreement check, as Immich would live it: hosts whose embeddings agree
serve (rounding included), a host with another model or other shapes never
answers a request of that task, two hosts that disagree without a reference
keep the one that served first, checks repeat on the clock, and what it
costs.  In memory under a Clock, and once over loopback with a host joining
a running fleet.
"""

import json

from memory import memory_balancer
from steering import events, host, metrics, sample, status
from support import bounded, rig, until
from twisted.internet import reactor
from twisted.internet.defer import gatherResults
from twisted.logger import LogLevel

from imml.agreement import MAX_MODELS, RETRY
from imml.backends import parse_backend
from imml.canaries import body as canary_body
from imml.classify import classify
from imml.fleet import BackendSettings
from imml.testing import ENTRIES, predict_body, start_fake_hosts


def balancer(*specs, agreement=None, **kw):
    """A balancer over C{specs} that spreads requests in turn, with the check on."""
    return memory_balancer(*specs, strategy="round-robin", agreement=agreement or {}, **kw)


def real(fake):
    """The requests C{fake} received that were not the agreement check's."""
    return [r for r in fake.received if "x-imml-canary" not in r.headers]


def canaries(fake):
    return [r for r in fake.received if "x-imml-canary" in r.headers]


def verdict(b, name, task="clip-visual"):
    [backend] = [x for x in b.fleet.backends if str(x.address) == address_of(b, name)]
    [view] = [v for v in b.agreement.views(backend) if v["task"] == task]
    return view


def address_of(b, name):
    return f"10.0.0.{[h.name for h in b.hosts].index(name) + 1}:3003"


def serve(b, count, task="clip-visual", seconds=1.0):
    """Send C{count} requests of C{task} and let them be answered: who answered each."""
    clients = []
    for n in range(count):
        clients.append(b.predict(task, image=b"\xff\xd8 picture %d" % n))
        b.advance(0.0001, step=0.0001)
    b.advance(seconds)
    answers = [c.answer() for c in clients]
    assert [a[0] for a in answers] == [200] * count
    return [a[1][b"x-fake-host"].decode() for a in answers]


def clip_request():
    """What the balancer reads of a request to index a photo."""
    content_type, body = predict_body(ENTRIES["clip-visual"], image=b"\xff\xd8 a photo")
    return classify(b"POST", b"/predict", content_type, body)


def agreement_events(b, **fields):
    return [e for e in b.events if e.get("imml_event") == "agreement" and all(e.get(k) == v for k, v in fields.items())]


def test_hosts_whose_vectors_differ_by_rounding_all_serve():
    b = balancer({"name": "a"}, {"name": "b", "vectors": "fp16"}, {"name": "c", "vectors": "fp16"})
    assert set(serve(b, 9)) == {"a", "b", "c"}
    for name in "abc":
        view = verdict(b, name)
        assert view["verdict"] == "agrees" and view["similarity"] > 0.9999


def test_a_host_with_another_model_serves_none_of_that_task_and_the_others_still():
    b = balancer({"name": "a"}, {"name": "b", "vectors": "other-model"}, {"name": "c"})
    assert "b" not in serve(b, 12)
    assert real(b.host("b")) == [] and len(canaries(b.host("b"))) == 1
    view = verdict(b, "b")
    assert view["verdict"] == "disagrees" and view["similarity"] < 0.5
    assert view["compared_with"] in (address_of(b, "a"), address_of(b, "c"))
    [event] = agreement_events(b, backend=address_of(b, "b"))
    assert event["log_level"] == LogLevel.warn and event["changed"] and event["verdict"] == "disagrees"
    # It is out of that task only: OCR (not checked) still goes to it.
    assert "b" in serve(b, 6, task="ocr")
    assert "b" in " ".join(b.agreement.conflicts())


def test_a_host_whose_vectors_have_another_length_disagrees_on_faces():
    b = balancer({"name": "a"}, {"name": "b"}, {"name": "c", "vectors": "wrong-shape"})
    assert "c" not in serve(b, 9, task="faces")
    view = verdict(b, "c", task="faces")
    assert (view["verdict"], view["reason"]) == ("disagrees", "vectors of 768 values, not 512")


def test_two_hosts_that_disagree_without_a_reference_keep_the_first_and_say_so():
    b = balancer({"name": "a"}, {"name": "b", "vectors": "other-model"})
    assert set(serve(b, 6)) == {"a"}
    [loud] = [e for e in b.events if e.get("imml_event") == "agreement-conflict"]
    assert loud["log_level"] == LogLevel.error
    assert address_of(b, "a") in loud["text"] and address_of(b, "b") in loud["text"]
    assert "reference = true" in loud["text"] and b.agreement.conflicts() == [loud["text"]]


def test_the_host_that_served_first_keeps_the_task_whatever_its_place():
    b = balancer({"name": "newcomer", "vectors": "other-model"}, {"name": "old"})
    newcomer = b.fleet.backends[0]
    b.fleet.drain(newcomer)
    assert set(serve(b, 3)) == {"old"}
    b.fleet.enable(newcomer)
    b.advance(0.1)
    assert verdict(b, "newcomer")["verdict"] == "disagrees"
    assert set(serve(b, 6)) == {"old"} and real(b.host("newcomer")) == []


def test_a_reference_host_is_right_even_alone_against_the_majority():
    b = balancer(
        {"name": "a"},
        {"name": "b"},
        {"name": "ref", "vectors": "other-model"},
        settings={"ref": BackendSettings(reference=True)},
    )
    assert set(serve(b, 6)) == {"ref"}
    assert [verdict(b, n)["verdict"] for n in ("a", "b", "ref")] == ["disagrees", "disagrees", "agrees"]
    assert verdict(b, "a")["compared_with"] == address_of(b, "ref")
    assert b.agreement.conflicts() != [] and not any(e.get("imml_event") == "agreement-conflict" for e in b.events)


def test_a_single_host_serves_at_once_with_nothing_to_compare():
    b = balancer({"name": "a", "service_time": 0.5})
    client = b.predict()
    b.advance(0.5, step=0.01)
    assert client.answer()[0] == 200
    assert verdict(b, "a")["reason"] == "nothing to compare"


def test_the_first_request_waits_for_one_canary_answer_and_no_more():
    # The cost in latency, measured: hosts taking 0.5 s per request answer
    # the first request of a task in 0.5 s (its canary) + 0.5 s, the next
    # ones in 0.5 s.
    b = balancer({"name": "a", "service_time": 0.5}, {"name": "b", "service_time": 0.5})
    first = b.predict()
    b.advance(0.95, step=0.01)
    assert first.answer() is None
    b.advance(0.1, step=0.01)
    assert first.answer()[0] == 200
    second = b.predict(image=b"\xff\xd8 another")
    b.advance(0.5, step=0.01)
    assert second.answer()[0] == 200
    assert [len(canaries(h)) for h in b.hosts] == [1, 1]


def test_a_host_slow_to_answer_its_canary_serves_only_after_it_agrees():
    b = balancer({"name": "fast", "service_time": 0.1}, {"name": "slow", "service_time": 0.1, "cold_start": 30.0})
    first = b.predict()
    b.advance(9.8, step=0.1)
    assert first.answer() is None  # the round waits for the slow host, up to --agreement-wait
    b.advance(0.5, step=0.1)
    assert first.answer()[1][b"x-fake-host"] == b"fast"
    assert verdict(b, "slow")["verdict"] == "pending"
    assert set(serve(b, 4)) == {"fast"}
    b.advance(20.0, step=0.5)
    assert verdict(b, "slow")["verdict"] == "agrees" and real(b.host("slow")) == []
    assert "slow" in serve(b, 4, seconds=0.5)


def test_checks_repeat_on_the_interval_and_a_host_rejoins_when_it_agrees_again():
    b = balancer({"name": "a"}, {"name": "b"}, {"name": "c"}, agreement={"interval": 600.0})
    serve(b, 3)  # checked at 0 s; served until 1 s
    b.host("b").vectors = "other-model"  # say, an upgrade with other model files
    b.advance(597.0, step=1.0)
    assert "b" in serve(b, 3)  # not checked again yet: 598 to 599 s
    b.advance(2.0, step=1.0)
    assert verdict(b, "b")["verdict"] == "disagrees"
    assert "b" not in serve(b, 6)
    b.host("b").vectors = "exact"
    b.advance(600.0, step=1.0)
    assert verdict(b, "b")["verdict"] == "agrees" and "b" in serve(b, 6)
    assert [len(canaries(h)) for h in b.hosts] == [3, 3, 3]


def test_canaries_cost_ten_requests_per_host_per_hour_for_the_three_tasks():
    b = balancer({"name": "a"}, {"name": "b"})
    for task in ("clip-visual", "clip-textual", "faces"):
        serve(b, 1, task=task)
    first_round = [len(canaries(h)) for h in b.hosts]
    assert first_round == [5, 5]  # 3 sentences, a picture, a face
    b.advance(3600.0, step=10.0)
    assert [len(canaries(h)) - n for h, n in zip(b.hosts, first_round)] == [10, 10]
    assert b.agreement.sent[(address_of(b, "a"), "clip-textual")] == 9


def test_a_host_drained_before_its_canary_went_is_checked_once_enabled():
    b = balancer({"name": "a"}, {"name": "b"})
    first = b.predict()
    b.fleet.drain(b.fleet.backends[1])  # before the canaries go, on the next turn
    b.advance(0.5)
    assert first.answer()[0] == 200 and b.host("b").received == []
    b.fleet.enable(b.fleet.backends[1])
    b.advance(0.1)
    assert verdict(b, "b")["verdict"] == "agrees" and "b" in serve(b, 4)


def test_a_host_back_from_down_is_checked_again_before_it_serves():
    b = balancer({"name": "a"}, {"name": "b"}, {"name": "c"})
    serve(b, 3)
    gone = b.fleet.backends[1]
    b.fleet.request_failed(gone, "connection refused")
    b.host("b").vectors = "other-model"  # it was re-imaged meanwhile
    for _ in range(2):
        b.fleet.check_passed(gone)
    assert gone.up
    assert "b" not in serve(b, 6)
    assert verdict(b, "b")["verdict"] == "disagrees" and len(canaries(b.host("b"))) == 2


def test_a_canary_that_fails_is_no_verdict_and_is_tried_again():
    b = balancer({"name": "a"}, {"name": "b", "failing_tasks": {"clip-visual"}})
    serve(b, 1)
    view = verdict(b, "b")
    assert view["verdict"] == "failed" and view["reason"] == "no answer to its last check: status 500"
    assert b.fleet.backends[1] in b.dispatcher.candidates(clip_request())
    b.host("b").failing_tasks = set()
    b.advance(RETRY + 1, step=1.0)
    assert verdict(b, "b")["verdict"] == "agrees"


def test_no_canary_goes_to_a_host_that_does_not_serve_the_task():
    b = balancer({"name": "a"}, {"name": "ocr-only"}, settings={"ocr-only": BackendSettings(tasks=frozenset({"ocr"}))})
    serve(b, 3)
    assert b.host("ocr-only").received == []


def send_models(b, count):
    """Send a request for each of C{count} models, and let them be answered."""
    for n in range(count):
        entries = '{"clip":{"visual":{"modelName":"made-up-%d"}}}' % n
        content_type, body = predict_body(entries, image=b"\xff\xd8 x")
        b.send(b"POST", b"/predict", body, {b"Content-Type": content_type})
    b.advance(1.0)


def test_the_models_followed_are_bounded_whatever_clients_send():
    b = balancer({"name": "a"}, {"name": "b"})
    send_models(b, MAX_MODELS + 3)
    assert len(b.agreement.views(b.fleet.backends[0])) == MAX_MODELS
    assert len([e for e in b.events if e.get("imml_event") == "agreement-full"]) == 1
    # Turned off and on, the check starts afresh: it says so again when full.
    b.agreement.set_on(False)
    b.agreement.set_on(True)
    send_models(b, MAX_MODELS + 1)
    assert len(b.agreement.views(b.fleet.backends[0])) == MAX_MODELS
    assert len([e for e in b.events if e.get("imml_event") == "agreement-full"]) == 2


def test_with_the_check_off_no_canary_is_sent_and_every_host_serves():
    b = balancer({"name": "a"}, {"name": "b", "vectors": "other-model"}, agreement={"on": False})
    assert set(serve(b, 4)) == {"a", "b"}
    assert canaries(b.host("a")) == canaries(b.host("b")) == []


def test_turning_the_check_off_at_run_time_lets_a_held_host_serve():
    b = balancer({"name": "a"}, {"name": "b"}, {"name": "c", "vectors": "other-model"})
    assert "c" not in serve(b, 6)
    b.agreement.set_on(False)
    assert "c" in serve(b, 6)


def test_a_new_threshold_judges_the_hosts_again_at_once():
    b = balancer({"name": "a"}, {"name": "b", "vectors": "fp16"}, {"name": "c"})
    assert "b" in serve(b, 3)
    b.agreement.set_thresholds({"clip-visual": 1.0, "clip-textual": 1.0, "faces": 1.0})
    assert verdict(b, "b")["verdict"] == "disagrees" and "b" not in serve(b, 6)


def test_a_request_that_only_disagreeing_hosts_could_take_is_told_why():
    b = balancer(
        {"name": "ref"},
        {"name": "b", "vectors": "other-model"},
        settings={"ref": BackendSettings(reference=True)},
        queue_timeout=5.0,
    )
    assert set(serve(b, 2)) == {"ref"}
    b.fleet.request_failed(b.fleet.backends[0], "connection refused")  # the reference goes down
    client = b.predict(image=b"\xff\xd8 one more")
    b.advance(5.5, step=0.5)
    code, _, body = client.answer()
    assert code == 503 and real(b.host("b")) == []
    assert json.loads(body)["detail"] == (
        "every ML host up that serves clip-visual gives answers that disagree (see the status page) within 5 s"
    )


@bounded(30)
async def test_a_bad_host_that_joins_a_running_fleet_never_answers_a_request_of_that_task():
    async with await rig([dict(name="good0"), dict(name="good1")], "--agreement", "on") as r:
        [bad] = await start_fake_hosts(reactor, [dict(name="bad", vectors="other-model")])
        try:
            assert (await r.predict()).code == 200
            # Requests keep coming while the bad host joins, comes up, and is checked.
            r.fleet.add(parse_backend(bad.address))
            r.balancer.checker.check_all()
            answered = []
            while not bad.received or len(answered) < 40:
                answered += await gatherResults([r.predict(image=b"\xff\xd8 %d" % n) for n in range(4)])
            backend = r.fleet.backends[2]
            await until(lambda: any(v["verdict"] == "disagrees" for v in r.balancer.agreement.views(backend)))
            answered += await gatherResults([r.predict(image=b"\xff\xd8 %d" % n) for n in range(8)])
            assert all(a.code == 200 for a in answered)
            assert {a.headers.getRawHeaders(b"x-fake-host")[0] for a in answered} == {b"good0", b"good1"}
            assert real(bad) == [] and len(canaries(bad)) == 1
            [view] = host(await status(r), bad.address)["agreement"]
            assert (view["task"], view["verdict"]) == ("clip-visual", "disagrees")
            assert view["compared_with"] in (r.hosts[0].address, r.hosts[1].address) and view["similarity"] < 0.5
            alerts = (await status(r))["balancer"]["alerts"]
            assert [a["kind"] for a in alerts] == ["hosts-disagree"]
            samples = await metrics(r)
            labels = dict(backend=bad.address, task="clip-visual", model="ViT-B-32__openai")
            assert sample(samples, "imml_backend_agreement", verdict="disagrees", **labels) == 1
            assert sample(samples, "imml_backend_agreement_similarity", **labels) < 0.5
            assert sample(samples, "imml_agreement_canaries_total", backend=bad.address, task="clip-visual") == 1
            assert any(e["backend"] == bad.address and e["verdict"] == "disagrees" for e in events(r, "agreement"))
        finally:
            await bad.stop()


def test_canaries_carry_the_hosts_extra_headers_as_its_requests_do():
    # Two hosts behind an authenticating proxy, each with its own token:
    # their canaries get through, and their answers are judged.
    tokens = {"a": "token-a", "b": "token-b"}
    b = balancer(
        *[{"name": name, "required_headers": {"X-Token": token}} for name, token in tokens.items()],
        settings={name: BackendSettings(headers=((b"x-token", token.encode()),)) for name, token in tokens.items()},
    )
    assert set(serve(b, 4)) == {"a", "b"}
    for name in "ab":
        assert verdict(b, name)["verdict"] == "agrees"
        assert [r.headers["x-token"] for r in canaries(b.host(name))] == [[tokens[name]]]


def test_the_first_round_ends_when_the_host_it_waits_for_leaves():
    b = balancer({"name": "fast", "service_time": 0.1}, {"name": "slow", "service_time": 0.1, "cold_start": 30.0})
    first = b.predict()
    b.advance(1.0, step=0.1)
    assert first.answer() is None  # the round waits for the slow host
    fast = b.fleet.backends[0]
    b.fleet.reconfigure([(fast.address, fast.settings)])  # the slow host is removed
    b.advance(0.5, step=0.1)
    assert first.answer()[1][b"x-fake-host"] == b"fast"
    assert verdict(b, "fast")["verdict"] == "agrees"


def test_a_canary_that_cannot_be_sent_is_no_verdict_and_is_tried_again(monkeypatch):
    b = balancer({"name": "a"}, {"name": "b"})
    made = []

    def body(*args):
        made.append(args)
        if len(made) == 1:  # the first canary, host a's
            raise RuntimeError("the picture cannot be encoded")
        return canary_body(*args)

    monkeypatch.setattr("imml.canaries.body", body)
    assert set(serve(b, 4)) == {"a", "b"}
    view = verdict(b, "a")
    assert view["verdict"] == "failed"
    assert view["reason"] == "no answer to its last check: it could not be sent (RuntimeError)"
    [logged] = [e for e in b.events if "log_failure" in e]
    assert logged["log_failure"].check(RuntimeError)
    b.advance(RETRY + 1, step=1.0)
    assert verdict(b, "a")["verdict"] == "agrees"


def test_a_check_that_finds_what_the_last_one_found_logs_nothing():
    b = balancer({"name": "a"}, {"name": "b"}, {"name": "c"}, {"name": "bad", "vectors": "other-model"})
    serve(b, 3)
    b.advance(3600.0, step=10.0)  # two more checks of each host
    said = sorted((e["backend"], e["verdict"]) for e in agreement_events(b))
    assert said == sorted([(address_of(b, n), "agrees") for n in "abc"] + [(address_of(b, "bad"), "disagrees")])
    assert len(canaries(b.host("a"))) == 3


def test_verdicts_wake_the_dispatcher_without_telling_the_hosts_observers():
    # (The health checker and the check's own scan follow the hosts: a
    # verdict changes none.)
    b = balancer({"name": "a"}, {"name": "b"}, {"name": "c", "vectors": "other-model"})
    told = []
    b.fleet.when_hosts_change(lambda: told.append(1))
    assert "c" not in serve(b, 6)
    assert verdict(b, "c")["verdict"] == "disagrees" and told == []


def test_the_canaries_of_a_host_that_left_are_no_longer_counted():
    # A DNS pool in Kubernetes: every pod restart is a new address.
    b = balancer({"name": "a"}, {"name": "b"})
    serve(b, 2)
    assert b.agreement.sent[(address_of(b, "b"), "clip-visual")] == 1
    kept = b.fleet.backends[0]
    b.fleet.reconfigure([(kept.address, kept.settings)])
    assert list(b.agreement.sent) == [(address_of(b, "a"), "clip-visual")]
