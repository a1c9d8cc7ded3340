-- Indexes for two common searches that had none.
--
-- PatientName searches (QIDO-RS, C-FIND) match case-insensitively (PS3.18 10.6.1.2.1).
-- They used lower(patient_name), which no index serves: every series row of the tenant was
-- read. The consumer now also stores the name folded to lower case (Python's str.lower,
-- the same folding the query applies to its value), and this index serves exact names and
-- prefixes ("DOE*"; on PostgreSQL, prefixes use it under C collation, as docker-compose
-- creates the database). Rows indexed before this migration are folded here.
ALTER TABLE dicom_state_meta ADD COLUMN patient_name_lower TEXT;
UPDATE dicom_state_meta SET patient_name_lower = lower(patient_name);
CREATE INDEX IF NOT EXISTS ix_state_patient_name ON dicom_state_meta (tenant_id, patient_name_lower);

-- Modality= at series level and ModalitiesInStudy= at study level (a subquery of the
-- studies holding a series of that modality).
CREATE INDEX IF NOT EXISTS ix_state_modality ON dicom_state_meta (tenant_id, modality);
