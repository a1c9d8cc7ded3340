"""Rendered and thumbnail resources, CORS and proxy headers of the web role."""

from __future__ import annotations

import io
from collections.abc import Iterator

import httpx
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pynetdicom import AE

from tests.support import Archive, wait_until

VIEWER = "http://viewer.test"
FILES = ("CT_small.dcm", "SC_rgb_rle_2frame.dcm", "MR_small_implicit.dcm", "US1_J2KR.dcm")


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Archive]:
    instance = Archive(tmp_path_factory.mktemp("rendered") / "data", env={
        "DICOMCLOUD_WEB__CORS_ORIGINS": VIEWER,
        "DICOMCLOUD_WEB__TRUST_FORWARDED_HEADERS": "true",
        "DICOMCLOUD_WEB__PROCESSES": "0",
    }).start()
    datasets = [pydicom.dcmread(get_testdata_file(name)) for name in FILES]
    ae = AE()
    for ds in datasets:
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", instance.dimse_port, ae_title="DICOMCLOUD")
    assert assoc.is_established
    try:
        assert [assoc.send_c_store(ds).Status for ds in datasets] == [0] * len(datasets)
    finally:
        assoc.release()
    wait_until(lambda: len(httpx.get(f"{instance.base}/dicomweb/instances").json())
               == len(datasets), message="the test files indexed")
    yield instance
    if instance.alive():
        instance.stop()


def url(archive: Archive, name: str, suffix: str) -> str:
    ds = pydicom.dcmread(get_testdata_file(name), stop_before_pixels=True)
    return (f"{archive.base}/dicomweb/studies/{ds.StudyInstanceUID}/series/"
            f"{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}{suffix}")


def image(response: httpx.Response) -> Image.Image:
    assert response.status_code == 200, response.text
    return Image.open(io.BytesIO(response.content))


@pytest.mark.parametrize("name", FILES)
def test_rendered_instance_is_a_jpeg_of_the_image_size(archive: Archive, name: str) -> None:
    ds = pydicom.dcmread(get_testdata_file(name), stop_before_pixels=True)
    response = httpx.get(url(archive, name, "/rendered"))
    assert response.headers["content-type"] == "image/jpeg"
    rendered = image(response)
    assert rendered.format == "JPEG"
    assert rendered.size == (ds.Columns, ds.Rows)


def test_png_with_window_equals_the_linear_voi_function_of_ps3_3(archive: Archive) -> None:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    response = httpx.get(url(archive, "CT_small.dcm", "/rendered?window=40,400"),
                         headers={"Accept": "image/png"})
    assert response.headers["content-type"] == "image/png"
    got = np.asarray(image(response))
    values = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    expected = np.clip(((values - 39.5) / 399 + 0.5) * 255, 0, 255).astype(np.uint8)
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1  # PNG is lossless


def test_viewport_scales_to_fit_keeping_the_aspect(archive: Archive) -> None:
    rendered = image(httpx.get(url(archive, "US1_J2KR.dcm", "/rendered?viewport=100,100")))
    ds = pydicom.dcmread(get_testdata_file("US1_J2KR.dcm"), stop_before_pixels=True)
    assert max(rendered.size) == 100
    assert abs(rendered.size[0] / rendered.size[1] - ds.Columns / ds.Rows) < 0.05


def test_second_frame_of_a_multi_frame_renders_and_a_missing_frame_is_404(
        archive: Archive) -> None:
    assert image(httpx.get(url(archive, "SC_rgb_rle_2frame.dcm", "/frames/2/rendered"))
                 ).mode == "RGB"
    assert httpx.get(url(archive, "SC_rgb_rle_2frame.dcm", "/frames/3/rendered")
                     ).status_code == 404


def test_thumbnails_at_every_level_fit_128_pixels(archive: Archive) -> None:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"), stop_before_pixels=True)
    study = f"{archive.base}/dicomweb/studies/{ds.StudyInstanceUID}"
    for target in (f"{study}/thumbnail", f"{study}/series/{ds.SeriesInstanceUID}/thumbnail",
                   url(archive, "CT_small.dcm", "/thumbnail"),
                   url(archive, "CT_small.dcm", "/frames/1/thumbnail")):
        assert max(image(httpx.get(target)).size) == 128, target


def _image_parts(response: httpx.Response) -> list[tuple[str, bytes]]:
    """(content type, body) of each part of a multipart/related response."""
    assert response.status_code == 200, response.text
    boundary = response.headers["content-type"].split("boundary=")[1].split(";")[0]
    out = []
    for chunk in response.content.split(b"--" + boundary.encode())[1:-1]:
        head, body = chunk.split(b"\r\n\r\n", 1)
        content_type = [line.split(b":", 1)[1].strip().decode() for line in
                        head.split(b"\r\n") if line.lower().startswith(b"content-type")]
        out.append((content_type[0], body[:-2]))
    return out


def test_rendered_series_and_study_are_one_image_part_per_instance(archive: Archive) -> None:
    """PS3.18 10.4.1.1.3: a rendered series or study is multipart/related of the rendered
    instances; the PNG of each part equals that instance's own rendered PNG."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"), stop_before_pixels=True)
    study = f"{archive.base}/dicomweb/studies/{ds.StudyInstanceUID}"
    series = f"{study}/series/{ds.SeriesInstanceUID}/rendered?window=40,400"
    response = httpx.get(series)  # no Accept: JPEG
    assert response.headers["content-type"].startswith('multipart/related; type="image/jpeg"')
    ((kind, body),) = _image_parts(response)
    assert kind == "image/jpeg"
    assert Image.open(io.BytesIO(body)).size == (ds.Columns, ds.Rows)

    png = _image_parts(httpx.get(series, headers={
        "Accept": 'multipart/related; type="image/png"'}))
    single = httpx.get(url(archive, "CT_small.dcm", "/rendered?window=40,400"),
                       headers={"Accept": "image/png"})
    assert png == [("image/png", single.content)]
    in_study = [n for n in FILES if pydicom.dcmread(
        get_testdata_file(n), stop_before_pixels=True).StudyInstanceUID == ds.StudyInstanceUID]
    study_parts = _image_parts(httpx.get(f"{study}/rendered"))
    assert len(study_parts) == len(in_study)
    assert all(kind == "image/jpeg" for kind, _ in study_parts)
    assert httpx.get(series, headers={"Accept": "image/gif"}).status_code == 406
    assert httpx.get(f"{archive.base}/dicomweb/studies/1.2.3/rendered").status_code == 404


@pytest.mark.parametrize("query", ["window=40", "window=a,b", "window=40,0",
                                   "window=40,400,cubic", "viewport=0,10", "viewport=1,2,3",
                                   "quality=0", "quality=abc", "colour=red"])
def test_bad_rendering_parameters_are_400_naming_the_parameter(archive: Archive,
                                                               query: str) -> None:
    response = httpx.get(url(archive, "CT_small.dcm", f"/rendered?{query}"))
    assert response.status_code == 400
    assert query.split("=")[0] in response.json()["message"]


def test_rendered_media_type_other_than_jpeg_or_png_is_406(archive: Archive) -> None:
    response = httpx.get(url(archive, "CT_small.dcm", "/rendered"),
                         headers={"Accept": "image/gif"})
    assert response.status_code == 406


def test_cors_preflight_and_simple_request_allow_the_configured_origin_only(
        archive: Archive) -> None:
    studies = f"{archive.base}/dicomweb/studies"
    preflight = httpx.options(studies, headers={"Origin": VIEWER,
                                                "Access-Control-Request-Method": "GET"})
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == VIEWER
    assert "GET" in preflight.headers["access-control-allow-methods"]
    simple = httpx.get(studies, headers={"Origin": VIEWER})
    assert simple.headers["access-control-allow-origin"] == VIEWER
    other = httpx.get(studies, headers={"Origin": "http://elsewhere.test"})
    assert "access-control-allow-origin" not in other.headers


def test_retrieve_urls_follow_trusted_forwarded_headers(archive: Archive) -> None:
    studies = httpx.get(f"{archive.base}/dicomweb/studies", headers={
        "X-Forwarded-Proto": "https", "X-Forwarded-Host": "pacs.example.org",
        "X-Forwarded-Prefix": "/archive"}).json()
    assert studies
    for study in studies:
        assert study["00081190"]["Value"][0].startswith(
            "https://pacs.example.org/archive/dicomweb/studies/")


def test_hostile_forwarded_host_is_ignored(archive: Archive) -> None:
    studies = httpx.get(f"{archive.base}/dicomweb/studies", headers={
        "X-Forwarded-Host": "evil.test/<script>", "X-Forwarded-Prefix": "/../x"}).json()
    assert all(s["00081190"]["Value"][0].startswith(f"{archive.base}/dicomweb/")
               for s in studies)


def test_forwarded_headers_are_ignored_unless_trusted(archive_factory) -> None:
    plain: Archive = archive_factory("untrusted")
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ae = AE()
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", plain.dimse_port, ae_title="DICOMCLOUD")
    assert assoc.send_c_store(ds).Status == 0
    assoc.release()
    wait_until(lambda: httpx.get(f"{plain.base}/dicomweb/studies").json(),
               message="the CT indexed")
    studies = httpx.get(f"{plain.base}/dicomweb/studies", headers={
        "X-Forwarded-Proto": "https", "X-Forwarded-Host": "pacs.example.org"}).json()
    assert studies[0]["00081190"]["Value"][0].startswith(f"{plain.base}/dicomweb/")


def test_viewport_region_is_clipped_to_the_image_and_negative_is_400(archive: Archive) -> None:
    clipped = image(httpx.get(url(archive, "CT_small.dcm",
                                  "/rendered?viewport=64,64,0,0,20000,20000")))
    assert clipped.size == (64, 64)
    negative = httpx.get(url(archive, "CT_small.dcm", "/rendered?viewport=64,64,-5,0,10,10"))
    assert negative.status_code == 400
