-- The embedded access log (dicomcloud.accesslog): one row per DICOMweb request and per
-- DICOM association, loaded from log_queue by the worker when no analytics store (Doris)
-- does it. trace_id makes a redelivered event a no-op. Rows older than
-- worker.access_log_days are deleted by the worker's housekeeping.
CREATE TABLE IF NOT EXISTS access_log (
    trace_id VARCHAR(64) NOT NULL PRIMARY KEY,
    event_time TIMESTAMP NOT NULL,
    worker_node_id VARCHAR(128),
    tenant_id VARCHAR(64) NOT NULL,
    protocol VARCHAR(16) NOT NULL,
    service VARCHAR(128) NOT NULL,
    route VARCHAR(256) NOT NULL,
    method VARCHAR(16),
    study_uid VARCHAR(64),
    series_uid VARCHAR(64),
    sop_uid VARCHAR(64),
    status INTEGER NOT NULL,
    bytes_in BIGINT NOT NULL,
    bytes_out BIGINT NOT NULL,
    duration_ms DOUBLE PRECISION NOT NULL,
    client_ip VARCHAR(64),
    principal VARCHAR(256),
    client_id VARCHAR(256),
    calling_ae VARCHAR(16),
    called_ae VARCHAR(16),
    user_agent VARCHAR(256),
    operations INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS ix_access_tenant_time ON access_log (tenant_id, event_time);
CREATE INDEX IF NOT EXISTS ix_access_time ON access_log (event_time);
