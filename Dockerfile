# dicomcloud: one image for every role. A container's roles come from its command, its
# backends from the environment (README "Scaling out"):
#
#   docker build -t dicomcloud .
#   docker run --init -p 11112:11112 -p 8080:8080 -v dicom:/data dicomcloud
#       every role on embedded backends, everything kept in the volume
#   docker run --init -e DICOMCLOUD_INDEX_URL=postgresql+asyncpg://... \
#       -e DICOMCLOUD_QUEUE_URL=kafka://... dicomcloud run --roles=consumer
#
# --init (compose: `init: true`) puts a small init in front of dicomcloud as PID 1, which
# forwards SIGTERM and reaps what the role processes leave behind.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# -- build: the package and its distributed drivers in a virtual environment -------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/dicomcloud
WORKDIR /src
# What the wheel is built from: pyproject.toml names README.md as the readme, and the wheel
# carries migrations/ and config/settings.toml (`dicomcloud migrate` reads them from there).
COPY pyproject.toml README.md ./
COPY config/settings.toml config/settings.toml
COPY migrations migrations
COPY src src
# On x86-64 every dependency comes as a manylinux wheel: no compiler needed. pip and
# setuptools go afterwards: nothing installs at run time.
RUN /opt/dicomcloud/bin/pip install '.[distributed]' \
    && /opt/dicomcloud/bin/pip uninstall --yes pip setuptools

# -- runtime ------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE}
# A fixed uid, so that a shared NFS export can be made writable for exactly this user.
RUN groupadd --system --gid 10001 dicom \
    && useradd --system --uid 10001 --gid dicom --home-dir /data --no-create-home \
       --shell /usr/sbin/nologin dicom \
    && mkdir -p /data /app/config \
    && chown dicom:dicom /data
COPY --from=build /opt/dicomcloud /opt/dicomcloud
# Settings are read from config/ under the working directory: the documented defaults,
# and a config/settings.local.toml an operator may mount beside them.
COPY config/settings.toml /app/config/settings.toml
WORKDIR /app
ENV PATH=/opt/dicomcloud/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    DICOMCLOUD_DATA_DIR=/data \
    DICOMCLOUD_SCP__HOST=0.0.0.0 \
    DICOMCLOUD_WEB__HOST=0.0.0.0
USER 10001:10001
# Embedded index and queue and the stored files (storage_url unset), or the mount point of
# the shared storage (DICOMCLOUD_STORAGE_URL=file:///data/storage).
VOLUME ["/data"]
# DIMSE (role scp) and HTTP (role web).
EXPOSE 11112 8080
# Liveness of the web role: GET /healthz on the web port (python: slim images have no curl).
# A container without the web role has no HTTP port and this check fails: give such a
# container its own check or none (docker-compose.yml does: C-ECHO for scp, none for
# consumer and worker). It follows DICOMCLOUD_WEB__PORT, not a port given with --http-port.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('DICOMCLOUD_WEB__PORT', '8080'), timeout=4)"]
# SIGTERM stops gracefully: running associations and requests finish (web.graceful_timeout).
STOPSIGNAL SIGTERM
ENTRYPOINT ["dicomcloud"]
CMD ["run"]
