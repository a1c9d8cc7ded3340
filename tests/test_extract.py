"""Index attributes read from headers: the fast reader agrees with pydicom's conversion."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from dicomcloud.extract import HeaderReader
from tests.support import valid_testdata

_KEYWORDS = (
    "PatientName", "PatientID", "PatientSex", "PatientBirthDate", "PatientAge",
    "PatientSize", "PatientWeight", "StudyDate", "StudyTime", "AccessionNumber", "StudyID",
    "StudyDescription", "Modality", "SeriesNumber", "SeriesDescription", "BodyPartExamined",
    "ProtocolName", "InstanceNumber", "ImageType", "ImageOrientationPatient",
    "ImagePositionPatient", "SliceThickness", "WindowCenter", "WindowWidth",
    "PhotometricInterpretation", "ReferringPhysicianName", "SpecificCharacterSet",
    "RescaleIntercept", "ContentDate",
)


class _Slow(HeaderReader):
    """The reference: pydicom's conversion only."""

    def _raw_text(self, keyword: str) -> str | None:
        return None


def _headers() -> list[Path]:
    charset = sorted((Path(pydicom.__file__).parent / "data" / "charset_files").glob("*.dcm"))
    return [s.path for s in valid_testdata()] + charset


@pytest.mark.parametrize("path", _headers(), ids=lambda p: p.name)
def test_fast_reader_reads_what_pydicom_reads(path: Path) -> None:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    fast, slow = HeaderReader(ds), _Slow(ds)
    for keyword in _KEYWORDS:
        assert fast.text(keyword) == slow.text(keyword), keyword
        assert fast.number(keyword) == slow.number(keyword), keyword
