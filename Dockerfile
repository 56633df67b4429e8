# The km-edge device image: the plain install (no torch) plus the [serve] extra, `km-edge` as the
# entrypoint.
#   docker buildx build --platform linux/arm64 -t km-edge:device .
#   docker run --rm -v "$PWD:/work" -v km-edge-state:/var/lib/km-edge km-edge:device run --pack packs/letters.kmp image.png
#   docker run -d -p 127.0.0.1:8080:8080 -v "$PWD:/work:ro" -v km-edge-state:/var/lib/km-edge \
#       km-edge:device serve --host 0.0.0.0 --packs /work/packs --token-file /work/token
# /work is expected to hold base/ and keys/signing.pub (or set KM_EDGE_BASE / KM_EDGE_PUBKEY).
# The anti-rollback state lives in the /var/lib/km-edge volume so it survives new containers.
# Build stage: compile the kernel-rebuild function (device_runtime/_kmnative.c) into a wheel for
# this platform; the final image gets the wheel, not the compiler.
FROM python:3.11-slim AS build
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY device_runtime/ device_runtime/
COPY km_edge/ km_edge/
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/km-edge
# Only what the plain install needs; every runtime dependency has linux/arm64 wheels.
COPY --from=build /wheels/ /wheels/
RUN whl=$(ls /wheels/km_edge-*.whl) && pip install --no-cache-dir "${whl}[serve]" && rm -rf /wheels \
    && python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is not None)" \
    && python -c "import sys; from device_runtime import native; sys.exit(native.engine() != 'native')" \
    && km-edge --help > /dev/null

RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin km-edge \
    && mkdir -p /work /var/lib/km-edge && chown km-edge:km-edge /work /var/lib/km-edge
ENV KM_EDGE_STATE=/var/lib/km-edge/rollback.json
VOLUME ["/var/lib/km-edge"]
EXPOSE 8080
USER km-edge
WORKDIR /work

ENTRYPOINT ["km-edge"]
CMD ["--help"]
