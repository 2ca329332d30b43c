# syntax=docker/dockerfile:1
# Multi-stage: a build stage installs exactly the locked dependencies (requirements.lock, hashes
# checked) and carecoord's own wheel into a virtual environment; the runtime stage is a slim
# image with that environment only (no source tree: the migrations ship inside the package),
# running as a non-root user. `carecoord serve` applies pending migrations before it listens
# (under an advisory lock: replicas starting together migrate once). Set DATABASE_URL; without
# it the embedded PostgreSQL starts in the /data volume (fine for trying it out, not production).
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# Dependencies first: this layer is rebuilt only when the lock file changes.
COPY requirements.lock ./
RUN pip install --require-hashes -r requirements.lock
COPY pyproject.toml README.md ./
COPY app ./app
RUN pip wheel --no-deps --wheel-dir /dist . \
    && pip install --no-deps /dist/carecoord-*.whl \
    && pip check

FROM python:3.11-slim AS runtime
RUN useradd --create-home --uid 10001 carecoord && mkdir /data && chown carecoord /data
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    CARECOORD_DATA_DIR=/data
USER carecoord
WORKDIR /home/carecoord
# The embedded PostgreSQL's cluster and the key that encrypts partner secrets
# (unless DATABASE_URL and CARECOORD_SECRET_KEY are set).
VOLUME /data
EXPOSE 8000
# --start-period: the first start of the embedded PostgreSQL runs initdb and every migration.
HEALTHCHECK --interval=30s --timeout=3s --start-period=90s --retries=3 \
    CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2).status == 200 else 1)"
# SIGTERM (docker stop) stops uvicorn, then the embedded PostgreSQL, then the process.
STOPSIGNAL SIGTERM
ENTRYPOINT ["carecoord"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
