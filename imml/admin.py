"""
The admin listener's resources (C{--admin}): the status page at C{/}, its
facts as JSON at C{/api/status}, Prometheus metrics at C{/metrics}, and the
actions C{POST /api/hosts/<host:port>/drain|enable|check}.

Everything but the actions only reads.  The actions answer only with
C{--admin-actions}, only to POST, and refuse a request that a page of
another origin sent (its C{Origin} header names another host): the balancer's
own port never serves any of this.  Each action is logged as one
C{admin-action} event.  C{docs/admin.md} describes the JSON.
"""

from __future__ import annotations

import json
from importlib import resources as package_files
from typing import Any, Callable, Optional

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.resource import Resource

from .fleet import Backend
from .health import HealthChecker
from .status import Status

log = Logger()

ACTIONS = ("drain", "enable", "check")


def _json(request: server.Request, value: Any, code: int = 200) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(value, indent=1).encode("utf-8")


def _error(request: server.Request, code: int, detail: str) -> bytes:
    return _json(request, {"detail": detail}, code)


def _answerable(request: server.Request) -> Callable[[], bool]:
    """
    A test of whether C{request} may still be answered: nobody answered it
    yet and its client has not gone away (which fails
    L{Request.notifyFinish<twisted.web.server.Request.notifyFinish>}).
    Call this before the request is answered.
    """
    gone: list[Failure] = []
    request.notifyFinish().addErrback(gone.append)
    return lambda: not gone and not request.finished


class _Page(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.html = package_files.files("imml").joinpath("status.html").read_bytes()

    def render_GET(self, request: server.Request) -> bytes:
        if request.postpath not in ([], [b""]):
            return _error(request, 404, "no such page")
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        # One self-contained page: nothing is loaded from anywhere else.
        request.setHeader(
            b"content-security-policy",
            b"default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
            b"connect-src 'self'; img-src data:; form-action 'none'; frame-ancestors 'none'",
        )
        return self.html


class _StatusDocument(Resource):
    isLeaf = True

    def __init__(self, status: Status) -> None:
        super().__init__()
        self.status = status

    def render_GET(self, request: server.Request) -> bytes:
        return _json(request, self.status.snapshot())


class _HostActions(Resource):
    """
    C{POST /api/hosts/<host:port>/<action>}.
    """

    isLeaf = True

    def __init__(self, status: Status, checker: HealthChecker) -> None:
        super().__init__()
        self.status = status
        self.checker = checker

    def render_GET(self, request: server.Request) -> bytes:
        request.setHeader(b"allow", b"POST")
        return _error(request, 405, "the host actions take POST")

    def _foreign(self, request: server.Request) -> bool:
        origin = request.getHeader(b"origin")
        if origin is None:
            return False
        host = request.getHeader(b"host") or b""
        return origin not in (b"http://" + host, b"https://" + host)

    def render_POST(self, request: server.Request) -> bytes | int:
        if len(request.postpath) != 2 or request.postpath[1].decode("ascii", "replace") not in ACTIONS:
            return _error(request, 404, "use POST /api/hosts/<host:port>/drain, enable or check")
        address, action = (part.decode("utf-8", "replace") for part in request.postpath)
        if not self.status.actions:
            return _error(request, 403, "actions are off: start the balancer with --admin-actions")
        if self._foreign(request):
            return _error(request, 403, "refused: the request came from a page of another origin")
        backend = self.status.find(address)
        if backend is None:
            return _error(request, 404, f"no ML host {address}")
        peer = getattr(request.getClientAddress(), "host", None)
        if action == "check":
            d = Deferred.fromCoroutine(self._check(request, _answerable(request), backend, peer))
            d.addErrback(lambda f: log.failure("check of {backend} failed", f, backend=address))
            return server.NOT_DONE_YET
        if action == "drain":
            self.status.fleet.drain(backend, "asked on the admin listener")
        elif backend.leaving:
            return _error(request, 409, f"{address} is leaving: it is no longer in the configuration")
        else:
            self.status.fleet.enable(backend)
        self._log(action, backend, peer)
        return _json(request, {"action": action, "host": self.status.host(backend)})

    async def _check(
        self, request: server.Request, answerable: Callable[[], bool], backend: Backend, peer: Optional[str]
    ) -> None:
        await self.checker.check(backend)
        self._log("check", backend, peer, result=backend.health.last_result)
        if answerable():
            request.write(_json(request, {"action": "check", "host": self.status.host(backend)}))
            request.finish()

    @staticmethod
    def _log(action: str, backend: Backend, peer: Optional[str], result: Optional[str] = None) -> None:
        log.info(
            "admin: {action} {backend} (asked from {peer})" + (": {result}" if result is not None else ""),
            action=action,
            backend=str(backend.address),
            peer=peer,
            result=result,
            imml_event="admin-action",
        )


class AdminSite(server.Site):
    """
    The admin listener's site; the page polls it, so requests are not
    logged one by one.
    """

    noisy = False

    def log(self, request: server.Request) -> None:
        pass


def admin_site(status: Status, checker: HealthChecker, metrics_resource: Resource) -> AdminSite:
    """
    The admin listener's site: the page, the JSON API and the metrics.
    """
    root = Resource()
    root.putChild(b"", _Page())
    api = Resource()
    api.putChild(b"status", _StatusDocument(status))
    api.putChild(b"hosts", _HostActions(status, checker))
    root.putChild(b"api", api)
    root.putChild(b"metrics", metrics_resource)
    return AdminSite(root)
