"""
Fakes for testing a balancer in front of Immich's machine-learning service,
shared by tests, benchmarks and users.

Like L{treq.testing}, this package ships with imml so that anyone can
exercise a balancer, or a strategy of their own, without a GPU or Immich's
ML models:

    - L{ENTRIES}, L{predict_body} and L{parse_predict} build and read the
      C{multipart/form-data} bodies Immich's server sends to C{POST /predict}
      (L{imml.testing.multipart});
    - L{FakeMLHost} speaks the ML service's protocol (C{/}, C{/ping},
      C{/predict}) with a bounded number of slots, per-task service times,
      cold starts and switchable failure modes (L{MODES}), over an in-memory
      resource or a real loopback port (L{imml.testing.fakehost},
      L{imml.testing.fakesite}; what it accepts and answers:
      L{imml.testing.answers});
    - L{MemoryAgent} is an in-memory L{twisted.web.iweb.IAgent} over several
      fake hosts, routed by address, for tests under a
      L{twisted.internet.task.Clock} (L{imml.testing.memory});
    - L{FakeBackendView} is a host as a strategy sees it, with plain
      settable attributes, for testing a strategy with lists of them
      (L{imml.testing.views});
    - L{start_fake_hosts} starts several hosts in-process (the balancer's
      demo mode, L{imml.testing.demo});
    - C{python -m imml.testing --listen tcp:0:interface=127.0.0.1 ...} runs
      one host as a child process and prints C{LISTENING host:port}
      (L{imml.testing.cli}).

The protocol follows C{docs/immich-ml.md} (Immich 3.1).  The task keys
(L{TASKS}) are those of L{imml.classify}.
"""

from __future__ import annotations

from .answers import KNOWN_MODELS, TASKS, VECTORS
from .answers import _embedding as _embedding
from .cli import main
from .demo import demo_specs, start_fake_hosts
from .fakehost import MODES, FakeMLHost
from .fakesite import Received
from .memory import MemoryAgent
from .multipart import ENTRIES, MultipartError, parse_predict, predict_body
from .views import FakeBackendView

__all__ = [
    "ENTRIES",
    "KNOWN_MODELS",
    "MODES",
    "TASKS",
    "VECTORS",
    "FakeBackendView",
    "FakeMLHost",
    "MemoryAgent",
    "MultipartError",
    "Received",
    "demo_specs",
    "main",
    "parse_predict",
    "predict_body",
    "start_fake_hosts",
]
