"""Certificates and keys for a loopback control plane.

One cluster CA signs a serving certificate (for 127.0.0.1, localhost and the in-cluster names
of the API server) and the admin client certificate; a separate key pair signs service-account
tokens. ECDSA P-256 everywhere: generation takes milliseconds, so a fresh cluster costs nothing.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# Names the API server answers to, inside and outside the cluster.
SERVING_DNS_NAMES = (
    "localhost",
    "kubernetes",
    "kubernetes.default",
    "kubernetes.default.svc",
    "kubernetes.default.svc.cluster.local",
)
# 127.0.0.1 for loopback clients; 10.96.0.1 is the first address of the service range the
# API server is started with, the ClusterIP of the `kubernetes` Service.
SERVING_IPS = ("127.0.0.1", "10.96.0.1")
ADMIN_USER = "cheapspot-admin"
ADMIN_GROUP = "system:masters"
_VALIDITY = dt.timedelta(days=365)


@dataclass(frozen=True)
class KeyPair:
    """PEM-encoded certificate and private key."""

    cert_pem: bytes
    key_pem: bytes


@dataclass(frozen=True)
class Pki:
    """Everything the control plane needs, PEM-encoded."""

    ca: KeyPair
    serving: KeyPair
    admin: KeyPair
    service_account_key_pem: bytes
    service_account_pub_pem: bytes


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _name(common_name: str, organization: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if organization:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    return x509.Name(attrs)


def _builder(
    subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey, now: dt.datetime
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        # Back-dated a minute so a clock a little behind still accepts a fresh certificate.
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + _VALIDITY)
    )


def generate_pki(now: dt.datetime | None = None) -> Pki:
    """A fresh CA, serving certificate, admin client certificate and service-account keys."""
    now = now or dt.datetime.now(dt.UTC)

    ca_key = _key()
    ca_name = _name("cheapspot-local-ca")
    ca_cert = (
        _builder(ca_name, ca_name, ca_key.public_key(), now)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )

    def issue(
        common_name: str,
        organization: str | None,
        usage: x509.ObjectIdentifier,
        sans: list[x509.GeneralName] | None = None,
    ) -> KeyPair:
        key = _key()
        builder = (
            _builder(_name(common_name, organization), ca_name, key.public_key(), now)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        return KeyPair(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))

    serving_sans: list[x509.GeneralName] = [x509.DNSName(n) for n in SERVING_DNS_NAMES]
    serving_sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in SERVING_IPS]
    serving = issue("kube-apiserver", None, ExtendedKeyUsageOID.SERVER_AUTH, serving_sans)
    # system:masters: the admin (and the controllers, which share its kubeconfig) may do anything.
    admin = issue(ADMIN_USER, ADMIN_GROUP, ExtendedKeyUsageOID.CLIENT_AUTH)

    sa_key = _key()
    return Pki(
        ca=KeyPair(ca_cert.public_bytes(serialization.Encoding.PEM), _key_pem(ca_key)),
        serving=serving,
        admin=admin,
        service_account_key_pem=_key_pem(sa_key),
        service_account_pub_pem=sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
    )


@dataclass(frozen=True)
class PkiFiles:
    """Where :func:`write_pki` put each file."""

    ca_cert: Path
    ca_key: Path
    serving_cert: Path
    serving_key: Path
    admin_cert: Path
    admin_key: Path
    sa_key: Path
    sa_pub: Path

    @classmethod
    def under(cls, directory: Path) -> PkiFiles:
        return cls(
            ca_cert=directory / "ca.crt",
            ca_key=directory / "ca.key",
            serving_cert=directory / "serving.crt",
            serving_key=directory / "serving.key",
            admin_cert=directory / "admin.crt",
            admin_key=directory / "admin.key",
            sa_key=directory / "sa.key",
            sa_pub=directory / "sa.pub",
        )


def write_pki(pki: Pki, directory: Path) -> PkiFiles:
    """Write ``pki`` under ``directory``; private keys are readable by the owner only."""
    directory.mkdir(parents=True, exist_ok=True)
    files = PkiFiles.under(directory)
    contents = {
        files.ca_cert: pki.ca.cert_pem,
        files.ca_key: pki.ca.key_pem,
        files.serving_cert: pki.serving.cert_pem,
        files.serving_key: pki.serving.key_pem,
        files.admin_cert: pki.admin.cert_pem,
        files.admin_key: pki.admin.key_pem,
        files.sa_key: pki.service_account_key_pem,
        files.sa_pub: pki.service_account_pub_pem,
    }
    for path, data in contents.items():
        path.write_bytes(data)
        path.chmod(0o600 if path.suffix == ".key" else 0o644)
    return files
