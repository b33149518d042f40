"""
The admin listener's resources (C{--admin}): the status page at C{/}, its
facts as JSON at C{/api/status}, Prometheus metrics at C{/metrics}, and the
actions C{POST /api/hosts/<host:port>/drain|enable|check}.

Everything but the actions only reads.  The actions answer only with
C{--admin-actions}, only to POST, and refuse a request that a page of
another origin sent (its C{Origin} header names another host): the balancer's
own port never serves any of this.  Each action is logged as one
C{admin-action} event.  C{docs/admin.md} describes the JSON.

Before any of it, L{AdminSite} asks its L{AdminGuard}: a request for a
name that is not the listener's own gets 421; once a token is set, one
without it gets 401, and the page at C{/} asks for it (L{_SignIn}).
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
from .guard import COOKIE, AdminGuard, host_of
from .health import HealthChecker
from .status import Status

log = Logger()

ACTIONS = ("drain", "enable", "check")

#: What a 401 says the admin listener takes.
REALM = b'Bearer realm="imml"'


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


def _status_page() -> bytes:
    return package_files.files("imml").joinpath("status.html").read_bytes()


class _Page(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.html = _status_page()

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


class _Refused(Resource):
    """
    The answer to a request the guard refused: C{code}, and
    C{{"detail": ...}} saying why.
    """

    isLeaf = True

    def __init__(self, code: int, detail: str, headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
        super().__init__()
        self.code, self.detail, self.headers = code, detail, headers

    def render(self, request: server.Request) -> bytes:
        for name, value in self.headers:
            request.setHeader(name, value)
        return _error(request, self.code, self.detail)


_SIGN_IN = b"""<body>
<h1>imml: ML hosts</h1>
<p class="facts">This admin listener needs its token
(--admin-token, --admin-token-file or IMML_ADMIN_TOKEN).</p>
<!--message-->
<form method="post" action="./">
  <label>token <input type="password" name="token" autocomplete="current-password" autofocus required></label>
  <button type="submit">open the status page</button>
</form>
</body>
</html>
"""


class _SignIn(Resource):
    """
    C{/} without the token: a form that asks for it (401), in the status
    page's head and style.  The token given in that form, or once in
    C{/?token=...}, sets the sign-in cookie (HttpOnly, SameSite=Strict) and
    leads to the page (303); a wrong one is asked for again.
    """

    isLeaf = True

    def __init__(self, guard: AdminGuard) -> None:
        super().__init__()
        self.guard = guard
        page = _status_page()
        self.html = page[: page.index(b"<body>")] + _SIGN_IN

    def render(self, request: server.Request) -> bytes:
        given = request.args.get(b"token")
        if given is None:
            return self._ask(request, b"")
        if len(given) == 1 and self.guard.right_token(given[0]):
            request.addCookie(COOKIE, self.guard.cookie(), httpOnly=True, sameSite="strict", secure=request.isSecure())
            request.setResponseCode(303)
            request.setHeader(b"location", b"./")  # the page, without the token in its address
            request.setHeader(b"cache-control", b"no-store")
            return b""
        return self._ask(request, b'<div id="banner" role="alert" style="display: block">That is not the token.</div>')

    def _ask(self, request: server.Request, message: bytes) -> bytes:
        request.setResponseCode(401)
        request.setHeader(b"www-authenticate", REALM)
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(
            b"content-security-policy",
            b"default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'",
        )
        return self.html.replace(b"<!--message-->", message)


def _misdirected(hosts: Optional[list[bytes]]) -> str:
    host = host_of(hosts[0].decode("ascii", "replace")) if hosts and len(hosts) == 1 else None
    if host is None:
        return "refused: the Host header does not name one host"
    return (
        f"refused: {host} is not a name of this admin listener; "
        f"to allow it, start the balancer with --admin-host {host}"
    )


class AdminSite(server.Site):
    """
    The admin listener's site; the page polls it, so requests are not
    logged one by one.  Every request is first put to its L{AdminGuard}.
    """

    noisy = False

    def __init__(self, resource: Resource, guard: AdminGuard) -> None:
        super().__init__(resource)
        self.guard = guard
        self.sign_in = _SignIn(guard)

    def log(self, request: server.Request) -> None:
        pass

    def getResourceFor(self, request: server.Request) -> Resource:
        resource = super().getResourceFor(request)
        refusal = self._refusal(request)
        return resource if refusal is None else refusal

    def _refusal(self, request: server.Request) -> Optional[Resource]:
        """
        What answers C{request} instead of the resource it asks for, if the
        guard refuses it.
        """
        guard, headers = self.guard, request.requestHeaders
        hosts = headers.getRawHeaders(b"host")
        if not guard.host_allowed(hosts):
            return _Refused(421, _misdirected(hosts))
        if guard.token is None:
            return None
        page = request.path == b"/"
        if page and b"token" in request.args:
            return self.sign_in
        authorization = headers.getRawHeaders(b"authorization", [])
        cookie = request.getCookie(COOKIE)
        if guard.authorized(authorization, cookie):
            return None
        if page and request.method in (b"GET", b"HEAD"):
            return self.sign_in
        if authorization or cookie is not None:
            detail = "refused: wrong token"
        else:
            detail = "this admin listener needs its token: send the header Authorization: Bearer <token>"
        return _Refused(401, detail, ((b"www-authenticate", REALM),))


def admin_site(status: Status, checker: HealthChecker, metrics_resource: Resource, guard: AdminGuard) -> AdminSite:
    """
    The admin listener's site: the page, the JSON API and the metrics,
    behind C{guard}.
    """
    root = Resource()
    root.putChild(b"", _Page())
    api = Resource()
    api.putChild(b"status", _StatusDocument(status))
    api.putChild(b"hosts", _HostActions(status, checker))
    root.putChild(b"api", api)
    root.putChild(b"metrics", metrics_resource)
    return AdminSite(root, guard)
