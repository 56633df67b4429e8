# The km-edge device image: the plain install (no torch) with `km-edge` as the entrypoint.
#   docker buildx build --platform linux/arm64 -t km-edge:device .
#   docker run --rm -v "$PWD:/work" km-edge:device run --pack packs/letters.kmp image.png
# /work is expected to hold base/ and keys/signing.pub (or set KM_EDGE_BASE / KM_EDGE_PUBKEY).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/km-edge
# Only what the plain install needs; every runtime dependency has linux/arm64 wheels.
COPY pyproject.toml README.md ./
COPY device_runtime/ device_runtime/
COPY km_edge/ km_edge/
RUN pip install --no-cache-dir . \
    && python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is not None)" \
    && km-edge --help > /dev/null

RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin km-edge \
    && mkdir -p /work && chown km-edge:km-edge /work
USER km-edge
WORKDIR /work

ENTRYPOINT ["km-edge"]
CMD ["--help"]
