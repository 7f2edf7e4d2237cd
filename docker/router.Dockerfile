# syntax=docker/dockerfile:1
# The router: slim Python, no torch (SPEC §1). Build from the repository root:
#   docker build -f docker/router.Dockerfile -t loraplex/router:0.1.0 .
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
# grpcio-tools generates the gRPC stubs; it is a build tool here, not part of the image.
RUN pip install --no-cache-dir "grpcio-tools>=1.70" "setuptools>=68" wheel
COPY pyproject.toml README.md ./
COPY proto proto
COPY loraplex loraplex
COPY router router
# shard/ and kernels/ stay out: nothing in this image can import torch code by accident.
RUN python -m loraplex.protogen && pip wheel --no-cache-dir --no-deps --no-build-isolation -w /wheels .

FROM ${PYTHON_IMAGE}
RUN apt-get update && apt-get install -y --no-install-recommends tini \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 1000 --user-group --create-home --shell /usr/sbin/nologin loraplex
COPY docker/requirements-router.txt /tmp/requirements-router.txt
RUN pip install --no-cache-dir -r /tmp/requirements-router.txt
COPY --from=build /wheels /tmp/wheels
# --no-deps: the project's own dependency list names torch; the router's come from requirements-router.txt.
RUN pip install --no-cache-dir --no-deps /tmp/wheels/*.whl && rm -rf /tmp/wheels /tmp/requirements-router.txt
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
