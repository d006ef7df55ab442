"""Generated PKI: the CA signs what it should, for the names clients use."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cheapspot_localcluster.certs import generate_pki, write_pki


def test_serving_and_admin_certificates_chain_to_the_ca(tmp_path: Path) -> None:
    pki = generate_pki()
    ca = x509.load_pem_x509_certificate(pki.ca.cert_pem)
    serving = x509.load_pem_x509_certificate(pki.serving.cert_pem)
    admin = x509.load_pem_x509_certificate(pki.admin.cert_pem)
    for cert in (serving, admin):
        cert.verify_directly_issued_by(ca)

    sans = serving.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("127.0.0.1") in sans.get_values_for_type(x509.IPAddress)
    assert "kubernetes.default.svc" in sans.get_values_for_type(x509.DNSName)
    usage = serving.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in usage

    orgs = admin.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    assert [o.value for o in orgs] == ["system:masters"]
    usage = admin.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.CLIENT_AUTH in usage

    files = write_pki(pki, tmp_path)
    assert stat.S_IMODE(files.ca_key.stat().st_mode) == 0o600
    assert stat.S_IMODE(files.sa_key.stat().st_mode) == 0o600
    assert files.sa_pub.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
