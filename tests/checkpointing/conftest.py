"""A real S3 API on loopback (moto's server, in-process) for the S3 and two-tier tests."""

from __future__ import annotations

import uuid

import pytest


class S3Server:
    """moto's threaded server on 127.0.0.1, stoppable and restartable on the same port. moto keeps
    its buckets in process memory, so objects survive a restart, as they would on real S3."""

    def __init__(self):
        from moto.server import ThreadedMotoServer

        self._cls = ThreadedMotoServer
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        _, self.port = self._server.get_host_and_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.running = True

    def stop(self) -> None:
        if self.running:
            self._server.stop()
            self.running = False

    def start(self) -> None:
        if not self.running:
            self._server = self._cls(ip_address="127.0.0.1", port=self.port, verbose=False)
            self._server.start()
            self.running = True

    def new_bucket(self) -> str:
        import boto3

        name = f"ckpt-{uuid.uuid4().hex[:12]}"  # S3 names need >= 3 characters; unique per test
        boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1").create_bucket(Bucket=name)
        return name

    def storage_options(self, **extra):
        # Fail fast when the server is down: one botocore attempt, one retry of ours.
        opts = {"endpoint_url": self.endpoint, "region": "us-east-1", "retries": 1,
                "retry_backoff_s": 0.05, "config_kwargs": {"retries": {"max_attempts": 1}},
                "skip_instance_cache": True}
        opts.update(extra)
        return opts


@pytest.fixture(scope="module")
def _moto_module():
    pytest.importorskip("moto.server", reason="moto[server] is in the test extra")
    pytest.importorskip("s3fs", reason="s3fs is in the test extra")
    mp = pytest.MonkeyPatch()
    for key, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                       ("AWS_DEFAULT_REGION", "us-east-1")):
        mp.setenv(key, value)
    for key in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN"):
        mp.delenv(key, raising=False)
    server = S3Server()
    yield server
    server.stop()
    mp.undo()


@pytest.fixture
def s3(_moto_module):
    """The module's moto server, running, with a fresh bucket: ``s3.bucket``."""
    _moto_module.start()
    _moto_module.bucket = _moto_module.new_bucket()
    yield _moto_module
    _moto_module.start()
