-- ROUTINE LOAD jobs that stream dicomcloud's Kafka topics into the tables of
-- 01_tables.sql. Before running, replace `kafka:9092` with your brokers, and prefix the
-- topic names if the archive's queue_url sets ?prefix=...:
--   mysql -h doris-fe -P 9030 -u root dicomcloud < migrations/doris/02_routine_load.sql
-- COLUMNS lists exactly the keys of each message body (tests/test_doris.py checks that
-- against the messages the archive publishes); format=json maps keys to columns by name.
-- log_queue carries two kinds of message, told apart by their log_type: object rows
-- ("object", into dicom_object_meta) and access events ("access", into dicom_access_log).
-- Each of its two jobs (a consumer group of its own) lists log_type, which is not a table
-- column, in COLUMNS and keeps its kind with PRECEDING FILTER: that filter runs on the
-- message before it is mapped to the table, so the other kind's messages count as
-- unselected rows, not errors (a WHERE filter runs after the mapping, where a message of
-- the other kind already failed the table's NOT NULL key columns and counted as an error).
-- Object rows published by versions before log_type existed have none: ifnull takes them
-- as object rows. Upgrading from such a version: recreate dicomcloud_object_meta with this
-- file before the new archive starts, else the old job meets access events and counts
-- each as an error until it pauses.
-- max_error_number lets a malformed message be skipped (and shown by
-- SHOW ROUTINE LOAD) instead of pausing the job.

CREATE ROUTINE LOAD dicomcloud_object_meta ON dicom_object_meta
COLUMNS(trace_id, worker_node_id, tenant_id, patient_id, study_uid, series_uid, sop_uid,
        file_size, file_path, transfer_syntax_uid, number_of_frames, created_time,
        series_uid_hash, study_uid_hash, accession_number, target_ts, study_date,
        transfer_status, source_ip, source_ae, log_type),
PRECEDING FILTER ifnull(log_type, 'object') = 'object'
PROPERTIES (
    "format" = "json",
    "strict_mode" = "false",
    "max_batch_interval" = "10",
    "max_error_number" = "1000"
)
FROM KAFKA (
    "kafka_broker_list" = "kafka:9092",
    "kafka_topic" = "log_queue",
    "property.group.id" = "doris_dicom_object_meta",
    "property.kafka_default_offsets" = "OFFSET_BEGINNING"
);

CREATE ROUTINE LOAD dicomcloud_state_meta ON dicom_state_meta
COLUMNS(tenant_id, patient_id, study_uid, series_uid, study_uid_hash, series_uid_hash,
        patient_name, patient_sex, patient_birth_date, patient_birth_time, patient_age,
        patient_size, patient_weight, pregnancy_status, study_date, study_date_origin,
        study_time, accession_number, study_id, study_description, modality, series_number,
        series_date, series_time, series_description, body_part_examined, protocol_name,
        series_related_instances, created_time, updated_time)
PROPERTIES (
    "format" = "json",
    "strict_mode" = "false",
    "max_batch_interval" = "10",
    "max_error_number" = "1000"
)
FROM KAFKA (
    "kafka_broker_list" = "kafka:9092",
    "kafka_topic" = "dicom_state_queue",
    "property.group.id" = "doris_dicom_state_meta",
    "property.kafka_default_offsets" = "OFFSET_BEGINNING"
);

CREATE ROUTINE LOAD dicomcloud_image_meta ON dicom_image_meta
COLUMNS(tenant_id, patient_id, study_uid, series_uid, sop_uid, study_date_origin,
        content_date, content_time, instance_number, image_type, image_orientation_patient,
        image_position_patient, slice_thickness, spacing_between_slices, slice_location,
        samples_per_pixel, photometric_interpretation, `rows`, `columns`, bits_allocated,
        bits_stored, high_bit, pixel_representation, rescale_intercept, rescale_slope,
        rescale_type, window_center, window_width, transfer_syntax_uid, pixel_data_location,
        thumbnail_location, sop_class_uid, image_status, space_size, created_time,
        updated_time)
PROPERTIES (
    "format" = "json",
    "strict_mode" = "false",
    "max_batch_interval" = "10",
    "max_error_number" = "1000"
)
FROM KAFKA (
    "kafka_broker_list" = "kafka:9092",
    "kafka_topic" = "dicom_image_queue",
    "property.group.id" = "doris_dicom_image_meta",
    "property.kafka_default_offsets" = "OFFSET_BEGINNING"
);

CREATE ROUTINE LOAD dicomcloud_access_log ON dicom_access_log
COLUMNS(tenant_id, protocol, service, route, status, client_ip, method, study_uid,
        series_uid, sop_uid, bytes_in, bytes_out, duration_ms, principal, client_id,
        calling_ae, called_ae, user_agent, operations, event_time, trace_id, worker_node_id,
        log_type),
PRECEDING FILTER log_type = 'access'
PROPERTIES (
    "format" = "json",
    "strict_mode" = "false",
    "max_batch_interval" = "10",
    "max_error_number" = "1000"
)
FROM KAFKA (
    "kafka_broker_list" = "kafka:9092",
    "kafka_topic" = "log_queue",
    "property.group.id" = "doris_dicom_access_log",
    "property.kafka_default_offsets" = "OFFSET_BEGINNING"
);
