"""dicomcloud: a DICOM archive with a standard DICOMweb API."""

__version__ = "0.1.0"
