-- Where the frames of uncompressed little-endian pixel data lie in the file, recorded by
-- the consumer from the header it reads anyway: WADO-RS frame requests then read the
-- frame straight from its offset without parsing the header again. NULL for compressed,
-- big endian or bit-packed pixel data, and for instances indexed before this migration;
-- those are served by reading the header.
ALTER TABLE dicom_instance ADD COLUMN pixel_offset BIGINT;
ALTER TABLE dicom_instance ADD COLUMN frame_size BIGINT;
