# syntax=docker/dockerfile:1.7
# One image for every rheo service: `rheo <service>` (ingest, dit-stage, decoder, egress, controller, gateway).
#   GPU (default):  docker build -t rheo:gpu .
#   CPU, tiny model: docker build --build-arg VARIANT=cpu -t rheo:cpu .
# No weights are baked in: mount them (Helm value model.source) and point model.model_dir at them.

ARG VARIANT=gpu
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
ARG NODE_IMAGE=node:22-bookworm-slim

# --- the Python interpreter both runtimes use (the venv below links to /usr/local/bin/python3.11) -------------
FROM ${PYTHON_IMAGE} AS python

# --- hls.js for the gateway's console and /player page: npm, through the same script `make up` runs -----------
FROM ${NODE_IMAGE} AS hlsjs
WORKDIR /src
COPY scripts/fetch-hlsjs.sh ./scripts/
RUN sh scripts/fetch-hlsjs.sh && test -f .cache/hlsjs/node_modules/hls.js/dist/hls.min.js

# --- builder: a self-contained virtual environment in /opt/rheo -----------------------------------------------
FROM python AS builder
ARG VARIANT
ARG TORCH_VERSION=2.13.0
ARG TORCH_CUDA=cu128
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/rheo
ENV PATH=/opt/rheo/bin:$PATH
# torch first, from the index that matches the variant (CPU wheel for the tiny image).
RUN if [ "$VARIANT" = "cpu" ]; then \
        pip install "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cpu; \
    else \
        pip install "torch==${TORCH_VERSION}" --index-url "https://download.pytorch.org/whl/${TORCH_CUDA}"; \
    fi
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proto ./proto
COPY services ./services
COPY media ./media
COPY wan ./wan
COPY ingest ./ingest
COPY encoder ./encoder
COPY dit_stage ./dit_stage
COPY decoder ./decoder
COPY egress ./egress
COPY pipeline ./pipeline
COPY jobs ./jobs
RUN pip install . && rheo config --keys > /dev/null
# where media.player.HLSJS_DEFAULT (the one definition) looks for it in the installed package
COPY --from=hlsjs /src/.cache/hlsjs/node_modules/hls.js/dist/hls.min.js /tmp/hls.min.js
RUN cd / && python -c "import shutil; from media.player import HLSJS_DEFAULT as d; \
    d.parent.mkdir(parents=True, exist_ok=True); shutil.copy('/tmp/hls.min.js', d); print('hls.js at', d)"

# --- runtimes ---------------------------------------------------------------------------------------------------
FROM ${CUDA_IMAGE} AS runtime-gpu
# The CUDA image has no Python 3.11: take the interpreter from the python stage (glibc of the base is newer).
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates libssl3t64 libffi8 libsqlite3-0 zlib1g libbz2-1.0 \
        liblzma5 libgomp1 \
    && rm -rf /var/lib/apt/lists/*
COPY --from=python /usr/local/bin/python3.11 /usr/local/bin/python3.11
COPY --from=python /usr/local/lib/python3.11 /usr/local/lib/python3.11
COPY --from=python /usr/local/lib/libpython3.11.so.1.0 /usr/local/lib/libpython3.11.so.1.0
# The venv links bin/python to /usr/local/bin/python, as in the python image.
RUN ln -s python3.11 /usr/local/bin/python3 && ln -s python3.11 /usr/local/bin/python && ldconfig

FROM python AS runtime-cpu
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 \
    && rm -rf /var/lib/apt/lists/*

# --- final image ------------------------------------------------------------------------------------------------
FROM runtime-${VARIANT} AS runtime
ARG VARIANT
LABEL org.opencontainers.image.title="rheo" \
      org.opencontainers.image.description="rheo live video restyling services (${VARIANT})" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --gid 10001 rheo && useradd --uid 10001 --gid 10001 --home-dir /tmp --no-create-home --shell /usr/sbin/nologin rheo
COPY --from=builder /opt/rheo /opt/rheo
ENV PATH=/opt/rheo/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    RHEO_TELEMETRY__LOG_JSON=true
# Read-only root filesystem in the cluster: everything written goes to /tmp (an emptyDir there).
WORKDIR /tmp
USER 10001:10001
EXPOSE 8080 1935 8090 7100 9464
ENTRYPOINT ["rheo"]
CMD ["--help"]
