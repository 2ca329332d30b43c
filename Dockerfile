# syntax=docker/dockerfile:1
# Multi-stage: build a virtual environment with carecoord and its dependencies, then
# copy it into a slim runtime image that runs as a non-root user. Migrations run at
# start (`carecoord serve` applies them before listening). Set DATABASE_URL; without
# it the embedded PostgreSQL starts in /data (fine for trying it out, not production).
FROM python:3.11-slim AS build
WORKDIR /srv/carecoord
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY pyproject.toml README.md ./
COPY app ./app
RUN pip install --no-cache-dir --upgrade pip && pip install --no-cache-dir .

FROM python:3.11-slim AS runtime
RUN useradd --create-home --uid 10001 carecoord && mkdir /data && chown carecoord /data
COPY --from=build /opt/venv /opt/venv
WORKDIR /srv/carecoord
COPY alembic ./alembic
COPY app ./app
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONPATH=/srv/carecoord \
    CARECOORD_DATA_DIR=/data
USER carecoord
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=3s CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/healthz').status == 200 else 1)"
ENTRYPOINT ["carecoord"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
