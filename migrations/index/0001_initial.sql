-- dicomcloud index schema, version 1.
-- Portable SQL: runs unchanged on PostgreSQL and SQLite (dicomcloud migrate).
-- Tables and columns of DESIGN.md; dicom_instance and the two extra series columns
-- (referring_physician_name, specific_character_set) are ours.

CREATE TABLE IF NOT EXISTS dicom_state_meta (
    tenant_id                VARCHAR(64)  NOT NULL,
    patient_id               VARCHAR(64)  NOT NULL,
    study_uid                VARCHAR(64)  NOT NULL,
    series_uid               VARCHAR(64)  NOT NULL,
    study_uid_hash           VARCHAR(20)  NOT NULL,
    series_uid_hash          VARCHAR(20)  NOT NULL,
    patient_name             TEXT,
    patient_sex              VARCHAR(16),
    patient_birth_date       DATE,
    patient_birth_time       VARCHAR(32),
    patient_age              VARCHAR(16),
    patient_size             DOUBLE PRECISION,
    patient_weight           DOUBLE PRECISION,
    pregnancy_status         INTEGER,
    study_date               DATE         NOT NULL,
    study_date_origin        VARCHAR(16),
    study_time               VARCHAR(32),
    accession_number         VARCHAR(64),
    study_id                 VARCHAR(64),
    study_description        TEXT,
    modality                 VARCHAR(16),
    series_number            INTEGER,
    series_date              DATE,
    series_time              VARCHAR(32),
    series_description       TEXT,
    body_part_examined       VARCHAR(64),
    protocol_name            TEXT,
    series_related_instances INTEGER      NOT NULL DEFAULT 0,
    created_time             TIMESTAMP    NOT NULL,
    updated_time             TIMESTAMP    NOT NULL,
    referring_physician_name TEXT,
    specific_character_set   VARCHAR(128),
    PRIMARY KEY (tenant_id, study_uid, series_uid)
);
CREATE INDEX IF NOT EXISTS ix_state_patient_id ON dicom_state_meta (tenant_id, patient_id);
CREATE INDEX IF NOT EXISTS ix_state_study_date ON dicom_state_meta (tenant_id, study_date_origin);
CREATE INDEX IF NOT EXISTS ix_state_accession ON dicom_state_meta (tenant_id, accession_number);
CREATE INDEX IF NOT EXISTS ix_state_series ON dicom_state_meta (tenant_id, series_uid);

CREATE TABLE IF NOT EXISTS dicom_instance (
    tenant_id           VARCHAR(64)  NOT NULL,
    sop_uid             VARCHAR(64)  NOT NULL,
    study_uid           VARCHAR(64)  NOT NULL,
    series_uid          VARCHAR(64)  NOT NULL,
    sop_class_uid       VARCHAR(64)  NOT NULL,
    instance_number     INTEGER,
    transfer_syntax_uid VARCHAR(64)  NOT NULL,
    number_of_frames    INTEGER      NOT NULL DEFAULT 1,
    image_rows          INTEGER,
    image_columns       INTEGER,
    bits_allocated      INTEGER,
    file_path           TEXT         NOT NULL,
    file_size           BIGINT       NOT NULL,
    created_time        TIMESTAMP    NOT NULL,
    updated_time        TIMESTAMP    NOT NULL,
    PRIMARY KEY (tenant_id, sop_uid)
);
CREATE INDEX IF NOT EXISTS ix_instance_series ON dicom_instance (tenant_id, study_uid, series_uid, instance_number);

CREATE TABLE IF NOT EXISTS dicom_json_meta (
    tenant_id         VARCHAR(64)  NOT NULL,
    study_uid         VARCHAR(64)  NOT NULL,
    series_uid        VARCHAR(64)  NOT NULL,
    study_uid_hash    VARCHAR(20)  NOT NULL,
    series_uid_hash   VARCHAR(20)  NOT NULL,
    study_date_origin VARCHAR(16),
    flag_time         TIMESTAMP    NOT NULL,
    created_time      TIMESTAMP    NOT NULL,
    json_status       INTEGER      NOT NULL DEFAULT 0,
    retry_times       INTEGER      NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant_id, study_uid, series_uid)
);
CREATE INDEX IF NOT EXISTS ix_json_due ON dicom_json_meta (json_status, flag_time);
