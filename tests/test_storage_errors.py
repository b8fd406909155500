"""Storage failures a person must fix, as a user meets them: one or two lines naming the URL, the cause
and the fix, exit code 2, no traceback (unless --debug). Real servers (moto's S3, the GCS emulator,
Azurite) and a real closed port."""

import os
import socket
import subprocess
import sys
import time

import pytest

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")


def _cli(*args, env: dict[str, str], cwd=None):
    """``signscale ...`` with only the store settings given here (none from the machine running the tests)."""
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("AWS_", "SIGNSCALE_", "AZURE_", "STORAGE_EMULATOR", "GCSFS_", "FSSPEC_"))}
    full = {**base, "PYTHONPATH": SRC, "AWS_SHARED_CREDENTIALS_FILE": os.devnull, "AWS_CONFIG_FILE": os.devnull,
            "AWS_EC2_METADATA_DISABLED": "true", "AWS_DEFAULT_REGION": "us-east-1", **env}
    started = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "signscale", *args], capture_output=True, text=True, env=full,
                       cwd=cwd, timeout=300, check=False)
    return r, time.monotonic() - started


def _lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.strip()]


def _closed_port() -> int:
    """A local port nobody listens on (bound, read back, released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CREDS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}


def _assert_explained(r, *needles):
    out = r.stdout + r.stderr
    assert r.returncode == 2, out
    assert "Traceback" not in out, out
    assert 1 <= len(_lines(r.stdout)) <= 2 and not r.stderr.strip(), out
    for n in needles:
        assert n in r.stdout, (n, out)


@pytest.mark.slow
def test_no_credentials_names_the_url_and_the_variables(s3_server, s3_bucket):
    url = f"{s3_bucket}/ds"
    r, _ = _cli("data", "info", url, env={"AWS_ENDPOINT_URL": s3_server.endpoint})
    _assert_explained(r, url, "no credentials", "AWS_ACCESS_KEY_ID", "AWS_PROFILE")


@pytest.mark.slow
def test_unreachable_endpoint_fails_fast_naming_the_endpoint_and_the_variable():
    port = _closed_port()
    url = "s3://some-bucket/ds"
    r, seconds = _cli("data", "info", url, env={**CREDS, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"})
    _assert_explained(r, url, f"127.0.0.1:{port}", "cannot reach", "AWS_ENDPOINT_URL")
    print(f"unreachable endpoint answered in {seconds:.1f}s")  # the figure for the notes, not an assert


def test_s3_clients_have_a_bounded_connect_timeout_and_retries(s3_server):
    """What keeps an unreachable endpoint to seconds: the client's own bounds (our retries skip it)."""
    from signscale import storage

    fs, _ = storage.filesystem("s3://any-bucket/x")
    assert fs.config_kwargs["connect_timeout"] == storage.CONNECT_TIMEOUT_S <= 5
    retries = fs.config_kwargs["retries"]  # botocore rewrites max_attempts 3 as total_max_attempts 4 once used
    assert retries["mode"] == "standard"
    assert retries.get("max_attempts", retries.get("total_max_attempts", 0) - 1) == 3


def test_transient_errors_of_a_reachable_store_are_still_retried():
    from signscale import storage

    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("reset by peer")  # reached the store, then lost: transient
        return "ok"

    assert storage.retry(flaky, what="s3://b/k") == "ok" and len(calls) == 3

    def refused():
        calls.append(1)
        raise ConnectionRefusedError("refused")  # never reached: the SDK below already retried

    calls.clear()
    with pytest.raises(storage.Unreachable):
        storage.retry(refused, what="s3://b/k")
    assert len(calls) == 1


@pytest.mark.slow
def test_no_such_bucket_names_the_bucket(s3_server):
    url = "s3://no-such-bucket-here/ds"
    r, _ = _cli("data", "info", url, env={**CREDS, "AWS_ENDPOINT_URL": s3_server.endpoint})
    _assert_explained(r, url, "no such bucket 'no-such-bucket-here'", "AWS_ENDPOINT_URL")


@pytest.mark.slow
def test_a_missing_bucket_is_not_a_missing_object(s3_bucket):
    """Callers read FileNotFoundError / exists() == False as "no such object"; a missing bucket needs
    another fix (create it, or fix the name or the endpoint), so it is an error of its own."""
    from signscale import storage

    with pytest.raises(storage.NoSuchBucket) as e:
        storage.read_bytes("s3://no-such-bucket-here/x")
    assert not isinstance(e.value, FileNotFoundError)
    with pytest.raises(storage.NoSuchBucket):
        storage.exists("s3://no-such-bucket-here/x")
    assert storage.exists(f"{s3_bucket}/absent") is False  # an absent key in a bucket that is there: a "no"


@pytest.mark.slow
def test_access_denied_names_the_cause_and_the_fix(monkeypatch, tmp_path):
    """A second moto server that checks credentials (moto's INITIAL_NO_AUTH_ACTION_COUNT=0): 403."""
    pytest.importorskip("moto.server")
    from signscale.testing import s3local

    monkeypatch.setenv("INITIAL_NO_AUTH_ACTION_COUNT", "0")  # read by the server process at start
    server = s3local.start()
    try:
        url = "s3://locked-bucket/ds"
        r, _ = _cli("data", "info", url, env={**CREDS, "AWS_ENDPOINT_URL": server.endpoint})
        _assert_explained(r, url, "access denied", "AWS_ACCESS_KEY_ID")
        r, _ = _cli("--debug", "data", "info", url, env={**CREDS, "AWS_ENDPOINT_URL": server.endpoint})
        assert "Traceback" in r.stderr and "AccessDenied" in r.stderr  # --debug: the whole story
    finally:
        server.stop()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["gcs", "azure"])
def test_gcs_and_azure_name_a_missing_bucket_and_an_unreachable_endpoint(kind, request):
    emu = request.getfixturevalue(f"{kind}_emulator")
    scheme, bucketish, variable = {"gcs": ("gs", "bucket", "STORAGE_EMULATOR_HOST"),
                                   "azure": ("az", "container", "AZURE_STORAGE_CONNECTION_STRING")}[kind]
    url = f"{scheme}://no-such-bucket-here/ds"
    r, _ = _cli("data", "info", url, env=emu.env())
    _assert_explained(r, url, f"no such {bucketish} 'no-such-bucket-here'", variable)
    port = _closed_port()
    r, _ = _cli("data", "info", url, env=emu.env(f"http://127.0.0.1:{port}"))
    _assert_explained(r, url, f"127.0.0.1:{port}", "cannot reach", variable)


def test_an_unreachable_endpoint_is_named_without_the_credentials_it_carries(monkeypatch):
    from signscale import storage

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://user:secret@127.0.0.1:9/")
    err = storage.explain(ConnectionRefusedError("refused"), "s3://b/k")
    assert isinstance(err, storage.Unreachable)
    assert "http://127.0.0.1:9 " in str(err) and "secret" not in str(err)
