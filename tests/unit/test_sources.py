"""Image sources (visionops.io.sources) and, on the same S3 server (SeaweedFS), the S3 review
area: an object deleted between listing and staging is left out with its reason, never
the end of the batch; an S3 review area remembers what it was sent."""

from __future__ import annotations

import hashlib

import pytest

from visionops.io.feedback import ReviewArea
from visionops.io.sources import S3Source, open_source
from visionops.jobs.scoring import input_facts, skip_reason


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    from visionops.ops.objectstore import start_seaweedfs

    store = start_seaweedfs(tmp_path_factory.mktemp("seaweedfs"), "visionops-test",
                            "visionops-test-secret")
    try:
        client = store.client()
        client.create_bucket(Bucket="scoring")
        yield client
    finally:
        store.stop(timeout=1)


def test_an_object_deleted_after_listing_is_skipped_with_its_reason(s3, tmp_path, make_image):
    for name, seed in (("a.png", 1), ("b.png", 2), ("c.png", 3)):
        s3.upload_file(str(make_image(tmp_path / name, seed=seed)), "scoring", f"day/{name}")
    source = S3Source("s3://scoring/day", client=s3)
    listed = source.list()
    s3.delete_object(Bucket="scoring", Key="day/b.png")

    with source.stage(listed) as staged:
        facts = input_facts(staged.root, staged.files, 8192)
        reasons = [staged.gone.get(name) or skip_reason(row)
                   for name, row in zip(staged.files, facts.to_dict("records"), strict=True)]

    assert [image.location for image in listed] == [f"s3://scoring/day/{n}.png" for n in "abc"]
    assert reasons == [None, "deleted since it was listed (NoSuchKey)", None]


def test_an_s3_review_area_sends_an_image_once(s3, tmp_path, make_image):
    area = ReviewArea("s3://scoring/review", client=s3)
    content = make_image(tmp_path / "a.png", seed=5).read_bytes()

    copy = area.add("a.png", content, "3", "PNG")
    s3.delete_object(Bucket="scoring", Key=copy.removeprefix("s3://scoring/"))  # reviewed

    assert copy == f"s3://scoring/review/3/a-{hashlib.sha256(content).hexdigest()[:12]}.png"
    assert area.add("a.png", content, "3", "PNG") is None
    keys = [item["Key"] for item in s3.list_objects_v2(Bucket="scoring",
                                                       Prefix="review/")["Contents"]]
    assert keys == [f"review/.visionops/sent/{hashlib.sha256(content).hexdigest()}"]


def test_a_file_gone_since_listing_is_a_fact_not_an_error(tmp_path, make_image):
    make_image(tmp_path / "images" / "a.png", seed=1)
    make_image(tmp_path / "images" / "b.png", seed=2)
    source = open_source(tmp_path / "images")
    with source.stage(source.list()) as staged:
        (staged.root / "b.png").unlink()
        facts = input_facts(staged.root, staged.files, 8192)

    assert [skip_reason(row) for row in facts.to_dict("records")] == [
        None, "gone since it was listed"]


@pytest.mark.parametrize("url", ["s3://key:sekrit@bucket/images",
                                 "s3://bucket/images?X-Amz-Signature=sekrit"])
def test_an_s3_source_url_carrying_a_credential_is_refused_without_echoing_it(url):
    with pytest.raises(ValueError, match="credentials come from the environment") as refused:
        open_source(url)
    assert "sekrit" not in str(refused.value)
