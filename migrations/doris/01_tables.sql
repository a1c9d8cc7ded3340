-- Apache Doris tables fed from dicomcloud's Kafka topics (DESIGN.md "Apache Doris").
-- Run once per analytics database, e.g.:
--   mysql -h doris-fe -P 9030 -u root -e 'CREATE DATABASE IF NOT EXISTS dicomcloud'
--   mysql -h doris-fe -P 9030 -u root dicomcloud < migrations/doris/01_tables.sql
--
-- Corrected from the reference DDL: no trailing comma in dicom_image_meta; the image
-- table names Rows/Columns `rows`/`columns` (not `width`); dicom_state_meta has the
-- series_related_instances column its routine load writes. Column types follow the
-- message bodies: dates YYYY-MM-DD, datetimes YYYY-MM-DD HH:MM:SS (the access log's
-- event_time YYYY-MM-DD HH:MM:SS.mmm, DATETIME(3)), nulls as JSON null.
-- VARCHAR lengths are bytes (UTF-8): person names and descriptions get room for
-- multi-byte character sets.

-- Every object received (C-STORE, STOW-RS), from the log_queue messages with log_type
-- "object": one row per reception.
CREATE TABLE IF NOT EXISTS dicom_object_meta (
    tenant_id            VARCHAR(64)   NOT NULL,
    patient_id           VARCHAR(256)  NOT NULL,
    study_uid            VARCHAR(64)   NOT NULL,
    series_uid           VARCHAR(64)   NOT NULL,
    sop_uid              VARCHAR(64)   NOT NULL,
    trace_id             VARCHAR(64),
    worker_node_id       VARCHAR(256),
    file_size            BIGINT,
    file_path            VARCHAR(1024),
    transfer_syntax_uid  VARCHAR(64),
    number_of_frames     INT,
    created_time         DATETIME,
    series_uid_hash      VARCHAR(20),
    study_uid_hash       VARCHAR(20),
    accession_number     VARCHAR(64),
    target_ts            VARCHAR(64),
    study_date           DATE,
    transfer_status      VARCHAR(32),
    source_ip            VARCHAR(64),
    source_ae            VARCHAR(64)
)
DUPLICATE KEY(tenant_id, patient_id, study_uid, series_uid, sop_uid)
DISTRIBUTED BY HASH(study_uid) BUCKETS AUTO
PROPERTIES ("replication_num" = "1");

-- One row per series with patient and study attributes, from dicom_state_queue; the
-- latest message of a series replaces the earlier ones (UNIQUE KEY, merge on write).
CREATE TABLE IF NOT EXISTS dicom_state_meta (
    tenant_id                VARCHAR(64)   NOT NULL,
    patient_id               VARCHAR(256)  NOT NULL,
    study_uid                VARCHAR(64)   NOT NULL,
    series_uid               VARCHAR(64)   NOT NULL,
    study_uid_hash           VARCHAR(20),
    series_uid_hash          VARCHAR(20),
    patient_name             VARCHAR(1024),
    patient_sex              VARCHAR(16),
    patient_birth_date       DATE,
    patient_birth_time       VARCHAR(32),
    patient_age              VARCHAR(16),
    patient_size             DOUBLE,
    patient_weight           DOUBLE,
    pregnancy_status         INT,
    study_date               DATE,
    study_date_origin        VARCHAR(16),
    study_time               VARCHAR(32),
    accession_number         VARCHAR(64),
    study_id                 VARCHAR(64),
    study_description        VARCHAR(1024),
    modality                 VARCHAR(16),
    series_number            INT,
    series_date              DATE,
    series_time              VARCHAR(32),
    series_description       VARCHAR(1024),
    body_part_examined       VARCHAR(64),
    protocol_name            VARCHAR(1024),
    series_related_instances INT,
    created_time             DATETIME,
    updated_time             DATETIME
)
UNIQUE KEY(tenant_id, patient_id, study_uid, series_uid)
DISTRIBUTED BY HASH(study_uid) BUCKETS AUTO
PROPERTIES ("replication_num" = "1", "enable_unique_key_merge_on_write" = "true");

-- One row per instance, from dicom_image_queue.
CREATE TABLE IF NOT EXISTS dicom_image_meta (
    tenant_id                  VARCHAR(64)   NOT NULL,
    patient_id                 VARCHAR(256)  NOT NULL,
    study_uid                  VARCHAR(64)   NOT NULL,
    series_uid                 VARCHAR(64)   NOT NULL,
    sop_uid                    VARCHAR(64)   NOT NULL,
    study_date_origin          VARCHAR(16),
    content_date               DATE,
    content_time               VARCHAR(32),
    instance_number            INT,
    image_type                 VARCHAR(1024),
    image_orientation_patient  VARCHAR(256),
    image_position_patient     VARCHAR(256),
    slice_thickness            DOUBLE,
    spacing_between_slices     DOUBLE,
    slice_location             DOUBLE,
    samples_per_pixel          INT,
    photometric_interpretation VARCHAR(32),
    `rows`                     INT,
    `columns`                  INT,
    bits_allocated             INT,
    bits_stored                INT,
    high_bit                   INT,
    pixel_representation       INT,
    rescale_intercept          DOUBLE,
    rescale_slope              DOUBLE,
    rescale_type               VARCHAR(256),
    window_center              VARCHAR(256),
    window_width               VARCHAR(256),
    transfer_syntax_uid        VARCHAR(64),
    pixel_data_location        VARCHAR(1024),
    thumbnail_location         VARCHAR(1024),
    sop_class_uid              VARCHAR(64),
    image_status               VARCHAR(32),
    space_size                 BIGINT,
    created_time               DATETIME,
    updated_time               DATETIME
)
UNIQUE KEY(tenant_id, patient_id, study_uid, series_uid, sop_uid)
DISTRIBUTED BY HASH(study_uid) BUCKETS AUTO
PROPERTIES ("replication_num" = "1", "enable_unique_key_merge_on_write" = "true");

-- One row per DICOMweb request and per DICOM association (dicomcloud/accesslog.py), from the
-- log_queue messages with log_type "access". The key sorts by time first (the newest
-- events of a period, of a tenant); rows are spread by trace_id (random, one per event).
-- event_time is UTC with milliseconds. Widths, in bytes: uid columns 256 because a
-- DICOMweb path's UID is logged as sent (64 characters at most, any of them); principal,
-- client_id and user_agent are cut to 256 characters (up to 1024 bytes; user_agent, read
-- as Latin-1, up to 512); AE titles 16 characters (64 bytes); service is the comma-separated
-- list of the association's DIMSE services; route the DICOMweb URL template or
-- "association"; status the HTTP status or the association's DIMSE status.
CREATE TABLE IF NOT EXISTS dicom_access_log (
    event_time      DATETIME(3)   NOT NULL,
    tenant_id       VARCHAR(64)   NOT NULL,
    protocol        VARCHAR(16),
    service         VARCHAR(128),
    route           VARCHAR(256),
    status          INT,
    client_ip       VARCHAR(64),
    method          VARCHAR(16),
    study_uid       VARCHAR(256),
    series_uid      VARCHAR(256),
    sop_uid         VARCHAR(256),
    bytes_in        BIGINT,
    bytes_out       BIGINT,
    duration_ms     DOUBLE,
    principal       VARCHAR(1024),
    client_id       VARCHAR(1024),
    calling_ae      VARCHAR(64),
    called_ae       VARCHAR(64),
    user_agent      VARCHAR(1024),
    operations      INT,
    trace_id        VARCHAR(64),
    worker_node_id  VARCHAR(256)
)
DUPLICATE KEY(event_time, tenant_id)
DISTRIBUTED BY HASH(trace_id) BUCKETS AUTO
PROPERTIES ("replication_num" = "1");
