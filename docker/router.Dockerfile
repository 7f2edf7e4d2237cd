# syntax=docker/dockerfile:1
# The router: slim Python, no torch (SPEC §1). Build from the repository root:
#   docker build -f docker/router.Dockerfile -t loraplex/router:0.1.0 .
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
# grpcio-tools generates the gRPC stubs; it is a build tool here, not part of the image.
RUN pip install --no-cache-dir "grpcio-tools>=1.70" "setuptools>=68" wheel
# A router-only project (docker/router-pyproject.toml): router/ becomes loraplex/router itself, not a link,
# and shard/, kernels/, the launcher and the bench never enter this stage, so the wheel cannot name them.
COPY docker/router-pyproject.toml pyproject.toml
COPY docker/requirements-router.txt requirements-router.txt
COPY proto proto
COPY loraplex/__init__.py loraplex/protogen.py loraplex/supervisor.py loraplex/
COPY loraplex/common loraplex/common
COPY router loraplex/router
# protogen is a build step (it needs grpcio-tools): it makes the stubs, then leaves.
RUN python -m loraplex.protogen && rm loraplex/protogen.py \
    && pip wheel --no-cache-dir --no-deps --no-build-isolation -w /wheels .

FROM ${PYTHON_IMAGE}
RUN apt-get update && apt-get install -y --no-install-recommends tini \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 1000 --user-group --create-home --shell /usr/sbin/nologin loraplex
COPY docker/requirements-router.txt /tmp/requirements-router.txt
RUN pip install --no-cache-dir -r /tmp/requirements-router.txt
COPY --from=build /wheels /tmp/wheels
# The wheel requires exactly requirements-router.txt, installed (and cached as a layer) just above.
RUN pip install --no-cache-dir /tmp/wheels/*.whl && rm -rf /tmp/wheels /tmp/requirements-router.txt
COPY docker/entrypoint.py /usr/local/bin/loraplex-entrypoint
# /data: the model volume (read-only here: the tokenizer); /run/loraplex: the shards' unix sockets.
RUN chmod 0755 /usr/local/bin/loraplex-entrypoint \
    && mkdir -p /data /run/loraplex && chown loraplex:loraplex /data /run/loraplex
ENV LORAPLEX_HOSTNAME=0.0.0.0 \
    PORT=8080 \
    GRPC_PORT=50051 \
    SHARD_SOCKET_DIR=/run/loraplex \
    PYTHONUNBUFFERED=1
USER 1000:1000
EXPOSE 8080 50051
HEALTHCHECK --interval=10s --timeout=6s --start-period=60s --retries=3 CMD ["loraplex-entrypoint", "health", "router"]
ENTRYPOINT ["tini", "--", "loraplex-entrypoint"]
CMD ["router"]
