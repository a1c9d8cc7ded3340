"""A first end-to-end pass: C-ECHO, C-STORE, QIDO."""

from __future__ import annotations

from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification

from tests.support import Archive, sample_file, wait_until


def test_echo_store_and_find(archive: Archive) -> None:
    ae = AE(ae_title="PYTEST")
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", archive.dimse_port, ae_title=archive.ae_title)
    assert assoc.is_established
    try:
        assert assoc.send_c_echo().Status == 0
        status = assoc.send_c_store(sample_file("CT_small.dcm"))
        assert status.Status == 0
    finally:
        assoc.release()
    study = "1.3.6.1.4.1.5962.1.2.1.20040119072730.12322"
    wait_until(lambda: archive.count(study) == 1, message="CT_small indexed")
