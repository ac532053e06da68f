"""Readers and vote files against a real S3 API (moto's server on loopback)."""

from __future__ import annotations

import traceback
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from s3server import free_port, start_moto_server

from ray_certseg import storage
from ray_certseg.config import JobConfig
from ray_certseg.data import ItemError, list_items, load_item
from ray_certseg.storage import StorageError
from ray_certseg.votes import check_schema_version, read_votes, write_votes

s3fs = pytest.importorskip("s3fs")

KEY, SECRET = "AKIADUMMYKEY0001", "dummy-secret-value-0002"


@pytest.fixture(scope="module")
def endpoint():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ACCESS_KEY_ID", KEY)
        mp.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        mp.delenv("AWS_ENDPOINT_URL", raising=False)
        mp.delenv("AWS_PROFILE", raising=False)
        with start_moto_server() as url:
            yield url


@pytest.fixture(scope="module")
def bucket(endpoint, tmp_path_factory):
    """s3://data-bucket/ds/: a manifest dataset (3 items) and a Cityscapes tree (1 item)."""
    root = tmp_path_factory.mktemp("s3src")
    rng = np.random.default_rng(0)
    arrays = []
    lines = ["image_path,label_path"]
    for i in range(3):
        image, label = (
            rng.integers(0, 256, (5, 7, 3), dtype=np.uint8),
            rng.integers(0, 4, (5, 7), dtype=np.uint8),
        )
        (root / "ds" / "imgs").mkdir(parents=True, exist_ok=True)
        (root / "ds" / "labels").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(root / "ds" / "imgs" / f"{i}.png")
        Image.fromarray(label).save(root / "ds" / "labels" / f"{i}.png")
        arrays.append((image, label))
        lines.append(f"imgs/{i}.png,labels/{i}.png")
    (root / "ds" / "list.csv").write_text("\n".join(lines) + "\n")
    city = root / "cs"
    for sub, name, array in [
        ("leftImg8bit", "aachen_000000_000019_leftImg8bit.png", arrays[0][0]),
        ("gtFine", "aachen_000000_000019_gtFine_labelTrainIds.png", arrays[0][1]),
    ]:
        (city / sub / "val" / "aachen").mkdir(parents=True)
        Image.fromarray(array).save(city / sub / "val" / "aachen" / name)
    fs = s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True)
    fs.mkdir("data-bucket")
    fs.put(str(root) + "/", "data-bucket/", recursive=True)
    return arrays


def opts(endpoint: str) -> dict:
    return {"endpoint_url": endpoint}


def test_manifest_dataset_listed_and_loaded_from_s3(endpoint, bucket):
    cfg = {
        "kind": "manifest",
        "manifest": "s3://data-bucket/ds/list.csv",
        "num_classes": 4,
        "storage_options": opts(endpoint),
    }
    refs = list_items(cfg)
    assert [r["image_path"] for r in refs] == [f"s3://data-bucket/ds/imgs/{i}.png" for i in range(3)]
    for ref, (image, label) in zip(refs, bucket):
        item = load_item(ref, cfg)
        np.testing.assert_array_equal(item["image"], image)
        np.testing.assert_array_equal(item["label"], label)


def test_cityscapes_on_s3_through_job_config(endpoint, bucket):
    job = JobConfig.from_dict(
        {
            "dataset": {"kind": "cityscapes", "root": "s3://data-bucket/cs"},
            "storage_options": opts(endpoint),
            "models": {"segmenters": {"s": {"kind": "torchscript", "path": "x.pt"}}},
            "methods": {"m": {"segmenter": "s"}},
        }
    )
    refs = list_items(job.dataset)
    assert [r["image_id"] for r in refs] == ["aachen_000000_000019"]
    np.testing.assert_array_equal(load_item(refs[0], job.dataset)["label"], bucket[0][1])


def test_endpoint_from_environment(endpoint, bucket, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    refs = list_items({"kind": "manifest", "manifest": "s3://data-bucket/ds/list.csv", "num_classes": 4})
    assert len(refs) == 3 and storage.exists("s3://data-bucket/ds/list.csv")


def test_votes_written_and_read_on_s3(endpoint, bucket):
    from test_votes import assert_same, record

    rows = [record(0, 4, 5), record(1, 3, 2, store_counts=True)]
    write_votes(rows, "s3://data-bucket/out/votes/part-0.parquet", storage_options=opts(endpoint))
    back = read_votes("s3://data-bucket/out/votes", storage_options=opts(endpoint))
    for a, b in zip(rows, back):
        assert_same(a, b)
    assert check_schema_version("s3://data-bucket/out/votes", storage_options=opts(endpoint)) == 2  # issue 14
    fs, path = storage.pyarrow_filesystem("s3://data-bucket/out/votes", opts(endpoint))
    import pyarrow.parquet as pq

    assert pq.read_table(f"{path}/part-0.parquet", filesystem=fs).num_rows == 2


def assert_no_credentials(exc: BaseException) -> None:
    text = "".join(traceback.format_exception(exc))
    assert KEY not in text and SECRET not in text and "sk-option-secret" not in text, text


def test_missing_bucket_is_a_clear_error_without_credentials(endpoint, bucket):
    so = {**opts(endpoint), "key": KEY, "secret": "sk-option-secret"}
    cases = [
        lambda: list_items(
            {
                "kind": "manifest",
                "manifest": "s3://no-such-bucket/list.csv",
                "num_classes": 4,
                "storage_options": so,
            }
        ),
        lambda: list_items({"kind": "cityscapes", "root": "s3://no-such-bucket/cs", "storage_options": so}),
        lambda: load_item(
            {
                "image_id": "x",
                "image_path": "s3://no-such-bucket/a.png",
                "label_path": "s3://no-such-bucket/a.png",
            },
            {"kind": "manifest", "manifest": "m.csv", "num_classes": 4, "storage_options": so},
        ),
        lambda: read_votes("s3://no-such-bucket/votes/x.parquet", storage_options=so),
    ]
    for case in cases:
        with pytest.raises(StorageError, match="bucket 'no-such-bucket' does not exist") as info:
            case()
        assert "create the bucket" in str(info.value)
        assert_no_credentials(info.value)


def test_missing_object_in_existing_bucket_is_an_item_error(endpoint, bucket):
    cfg = {
        "kind": "manifest",
        "manifest": "s3://data-bucket/ds/list.csv",
        "num_classes": 4,
        "storage_options": opts(endpoint),
    }
    ref = {**list_items(cfg)[0], "label_path": "s3://data-bucket/ds/labels/missing.png"}
    with pytest.raises(ItemError) as info:
        load_item(ref, cfg)
    assert info.value.stage == "read_label" and "missing.png" in str(info.value)


def test_unreachable_endpoint_is_a_clear_error(endpoint):
    port = free_port()  # nothing listens on a port the OS just reported free
    so = {
        "endpoint_url": f"http://127.0.0.1:{port}",
        "secret": "sk-option-secret",
        "key": KEY,
        "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2},
    }
    with pytest.raises(StorageError, match="cannot reach the object store for bucket 'data-bucket'") as info:
        storage.read_bytes("s3://data-bucket/ds/list.csv", so)
    assert "AWS_ENDPOINT_URL" in str(info.value)
    assert_no_credentials(info.value)


def test_redact_removes_secrets_and_url_passwords():
    text = storage.redact(
        f"failed {KEY} {SECRET} tok-123456 http://user:pw@host/x",
        {"client_kwargs": {"aws_session_token": "tok-123456"}},
    )
    assert KEY not in text and "tok-123456" not in text and "pw@" not in text and "host/x" in text


def test_local_paths_ignore_storage_options(tmp_path: Path):
    (tmp_path / "f.txt").write_text("x")
    assert storage.read_bytes(str(tmp_path / "f.txt"), {"endpoint_url": "http://nowhere"}) == b"x"
    assert storage.join("s3://b/a/sub", "..", "imgs/x.png") == "s3://b/a/imgs/x.png"
    assert storage.join(str(tmp_path), "x/../y") == str(tmp_path / "y")
    assert storage.join("s3://b/a", "s3://c/y") == "s3://c/y"


@pytest.mark.parametrize(
    "error,message",
    [
        (PermissionError(f"AccessDenied for {KEY}"), "access denied to bucket 'secure-bucket'"),
        ("no-credentials", "no credentials found for bucket 'secure-bucket'"),
    ],
)
def test_denied_and_no_credentials_become_storage_errors(monkeypatch, error, message):
    from botocore.exceptions import NoCredentialsError

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY)
    with (
        pytest.raises(StorageError, match=message) as info,
        storage.translate_errors("s3://secure-bucket/x.parquet"),
    ):
        raise NoCredentialsError() if error == "no-credentials" else error
    assert_no_credentials(info.value)


def test_listings_see_what_another_process_wrote_or_removed(endpoint):
    """Ray's workers write the vote files through their own S3 clients: every listing on the driver (glob,
    exists, the run folder's files and the vote files) must see them, and must not list a file since moved."""
    from ray_certseg.job.rundir import RunDir
    from ray_certseg.votes import parquet_files

    other = s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True)
    other.mkdir("listing-bucket")
    run = RunDir("s3://listing-bucket/run", opts(endpoint))

    def listed() -> tuple:
        return (
            run.exists("votes"),
            [p.rsplit("/", 1)[-1] for p in storage.glob(run.path("votes", "*.parquet"), run.storage_options)],
            [p.rsplit("/", 1)[-1] for p in run.files("votes")],
            [p.rsplit("/", 1)[-1] for p in parquet_files(run.url, storage_options=run.storage_options)[1]],
        )

    assert listed() == (False, [], [], [])
    other.pipe("listing-bucket/run/votes/a.parquet", b"x")
    assert listed() == (True, ["a.parquet"], ["a.parquet"], ["a.parquet"])
    other.pipe("listing-bucket/run/votes/b.parquet", b"x")
    other.rm("listing-bucket/run/votes/a.parquet")
    assert listed() == (True, ["b.parquet"], ["b.parquet"], ["b.parquet"])
