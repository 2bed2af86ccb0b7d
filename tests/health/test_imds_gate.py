"""Off EC2 the default IMDS endpoint is never contacted: the machine is asked first."""

from health import imds


def test_local_evidence_decides(tmp_path):
    vendor = tmp_path / "sys_vendor"
    vendor.write_text("Amazon EC2\n")
    assert imds.looks_like_ec2((str(vendor),))
    vendor.write_text("QEMU\n")
    assert not imds.looks_like_ec2((str(vendor), str(tmp_path / "missing")))
    uuid = tmp_path / "uuid"
    uuid.write_text("ec2e1916-9099-7caf-fd21-012345abcdef")
    assert imds.looks_like_ec2((str(uuid),))


def test_default_endpoint_is_off_without_a_packet(monkeypatch):
    monkeypatch.setattr(imds, "looks_like_ec2", lambda *a: False)

    def no_network(*a, **k):
        raise AssertionError("IMDS was contacted off EC2")

    monkeypatch.setattr(imds._OPENER, "open", no_network)
    c = imds.ImdsClient()
    assert not c.available() and "not an EC2 instance" in c.disabled_reason
    assert c.spot_instance_action() is None
