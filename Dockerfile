# imml: a balancer for Immich's machine-learning requests, as a container.
# Replaces the nginx-based immich_ml_balancer image: same IMML_BACKENDS
# variable (host[:port], comma separated, port 3003 when omitted), same port 80.
# See docs/container.md; for both linux/amd64 and linux/arm64 (every
# dependency has wheels for both), docs/deploying.md.
#
#   docker build -t imml .
#   docker run --rm -p 3003:80 -e IMML_BACKENDS=192.168.0.123:3003 imml

ARG PYTHON_IMAGE=python:3.12-slim

# ---- build: the project's wheel, installed with its dependencies into a venv ----
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
COPY . .
RUN pip wheel --no-deps --wheel-dir /wheels . \
 && python -m venv --without-pip /opt/imml \
 && pip --python /opt/imml/bin/python install /wheels/imml-*.whl
# Twisted ships its own test suites (~15 MB); drop those of its subpackages.
# twisted/test itself stays: treq.testing (and fakes built on it) import
# twisted.test.iosim and proto_helpers.
RUN find /opt/imml/lib/python3*/site-packages/twisted -mindepth 2 -type d -name test -prune \
        -exec rm -rf {} + \
 && /opt/imml/bin/python -c "import imml.tap, imml.entrypoint, treq.testing, twisted.web.server" \
 && test -x /opt/imml/bin/imml-balancer

# ---- runtime: the venv only; no wheel, no source, no compiler, no pip cache ----
FROM ${PYTHON_IMAGE}
ENV PATH=/opt/imml/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    IMML_BACKENDS="" \
    IMML_HEALTHCHECK_URL=http://127.0.0.1:80/ping

RUN groupadd --system --gid 10001 imml \
 && useradd --system --uid 10001 --gid 10001 --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin imml
COPY --from=build /opt/imml /opt/imml

# Write twisted/plugins/dropin.cache now, as root, so that the non-root user
# never needs to (it could not: site-packages belongs to root), and fail the
# build if twistd would not find the plugin.
RUN python -c "from twisted.plugin import IPlugin, getPlugins; \
names = [getattr(p, 'tapname', None) for p in getPlugins(IPlugin)]; \
assert 'imml-balancer' in names, names" \
 && ls -l /opt/imml/lib/python3*/site-packages/twisted/plugins/dropin.cache

USER 10001:10001
WORKDIR /tmp

# The balancer. Docker gives a container in its own network namespace
# net.ipv4.ip_unprivileged_port_start=0, so the non-root user may bind port 80;
# with host networking it may not: pass e.g. `--listen tcp:3013` instead.
EXPOSE 80
# The admin listener: status page, /api/status, /metrics (docs/admin.md). It
# is read-only unless --admin-actions is given, and open to every client
# unless IMML_ADMIN_TOKEN_FILE (or IMML_ADMIN_TOKEN) gives it a token: without
# one, publish it only where you trust every client, e.g.
# `-p 127.0.0.1:8080:8080`. Names you reach it by go in IMML_ADMIN_HOSTS.
EXPOSE 8080

# The balancer's /ping answers 200 while at least one ML host is up and 503
# while none is: "unhealthy" then means "no ML host reachable".
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.build_opener(u.ProxyHandler({})).open(os.environ['IMML_HEALTHCHECK_URL'], timeout=4).read()"]

# imml-balancer runs `twistd --nodaemon --pidfile= imml-balancer`, adding
# --strategy and --config from IMML_STRATEGY and IMML_CONFIG when they are set
# (and the command does not give them), and execs it: twistd is PID 1 and gets
# SIGTERM itself (`docker stop`); it stops its services, listener first, and
# exits 0. --nodaemon logs to stdout. Options after the image name replace
# CMD, e.g.:
#   docker run ... imml --listen tcp:80 --strategy round-robin
ENTRYPOINT ["imml-balancer"]
CMD ["--listen", "tcp:80", "--admin", "tcp:8080"]
