# The regional coordinator as a container (not built in CI).
#
#   docker build -t edgeci-coordinator .
#   docker run -d --name coord-eu -v edgeci-eu:/var/lib/edgeci -p 127.0.0.1:9464:9464 \
#       -e EDGECI_BROKER=mqtt://broker:1883 -e EDGECI_REGION=eu edgeci-coordinator
#   docker kill -s HUP coord-eu        # re-read the config file (EDGECI_CONFIG / --config)
#
# Configuration: EDGECI_* variables (the flags' names), or mount a TOML file and set
# EDGECI_CONFIG (see deploy/edgeci-coordinator.toml.example).
#
# The example above is a trial: over plain mqtt:// and without a bundle, devices (and peer
# coordinators) trust the first model-signing key they see (trust on first use). That is
# insecure: anyone who can publish on the broker before this coordinator does becomes the key
# they trust. For a fleet, issue identities with `edgeci pki issue` (docs/security.md), mount
# this coordinator's bundle read-only and use TLS:
#   -v /etc/edgeci/PKI/bundles/coord-eu:/bundle:ro -e EDGECI_BUNDLE=/bundle \
#   -e EDGECI_BROKER=mqtts://broker:8883
# and give each device its own bundle: its trusted/ folder holds the coordinators' keys.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY edge_sdk ./edge_sdk
COPY coordinator ./coordinator
COPY devices ./devices
COPY demos ./demos
# CPU-only torch wheels: the coordinator aggregates and validates on the CPU.
RUN pip install --extra-index-url https://download.pytorch.org/whl/cpu ".[coordinator]" \
    && useradd --system --uid 10001 --home-dir /var/lib/edgeci --create-home --shell /usr/sbin/nologin edgeci

USER edgeci
WORKDIR /var/lib/edgeci
ENV EDGECI_STATE_DIR=/var/lib/edgeci \
    EDGECI_METRICS_PORT=9464 \
    EDGECI_METRICS_HOST=0.0.0.0 \
    EDGECI_LOG_FORMAT=json
VOLUME ["/var/lib/edgeci"]
EXPOSE 9464

HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD python -c "import os, sys, urllib.request; port = os.environ.get('EDGECI_METRICS_PORT', '9464'); sys.exit(0 if urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=4).status == 200 else 1)"

STOPSIGNAL SIGTERM
ENTRYPOINT ["edgeci"]
CMD ["coordinator"]
