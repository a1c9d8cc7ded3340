# dicomcloud: one image, every role. Roles, ports and backends come from the environment.
#   docker build -t dicomcloud .
#   docker run -p 11112:11112 -p 8080:8080 -v dicom:/data dicomcloud
FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
COPY migrations ./migrations
COPY config ./config
RUN pip wheel --no-cache-dir --wheel-dir /wheels '.[distributed]'

FROM python:3.11-slim-bookworm
RUN groupadd --system dicom && useradd --system --gid dicom --home-dir /data dicom \
    && mkdir -p /data /app/config && chown dicom:dicom /data
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
COPY config/settings.toml /app/config/settings.toml
WORKDIR /app
USER dicom
ENV DICOMCLOUD_DATA_DIR=/data \
    DICOMCLOUD_SCP__HOST=0.0.0.0 \
    DICOMCLOUD_WEB__HOST=0.0.0.0 \
    PYTHONUNBUFFERED=1
VOLUME ["/data"]
EXPOSE 11112 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s \
    CMD python -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:8080/readyz', timeout=4)" || exit 1
STOPSIGNAL SIGTERM
ENTRYPOINT ["dicomcloud"]
CMD ["run"]
