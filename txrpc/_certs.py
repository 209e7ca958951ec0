"""Development certificates: a local CA and node/client certificates (``txrpc certs dev``).

For tests, the demo and a cluster on one machine — not for production, where the
operator's own CA issues the certificates. Keys are ECDSA P-256; every leaf certificate
names ``CN=<name>`` (the identity a server derives from it), is valid for both TLS
server and client use, and lists ``localhost``, ``127.0.0.1`` and ``::1`` (and the name,
when it is a valid DNS label) as subject alternative names, so hostname verification
passes on loopback. Private keys are written with mode 0600.
"""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import os
import re
import secrets
from collections.abc import Iterable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from . import _env

CA_NAME_DEFAULT = "txrpc dev CA"
DAYS_DEFAULT = 30
TOKEN_SECRET_BYTES = 32
_DNS_LABEL = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")


@dataclasses.dataclass(frozen=True, slots=True)
class Authority:
    """A CA: its certificate and private key."""

    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey


@dataclasses.dataclass(frozen=True, slots=True)
class DevCerts:
    """Where ``make_dev_certs`` wrote things: ``ca_file``, ``certs_dir`` (``<name>.pem`` and
    ``<name>.key`` per name) and ``token_secret_file``."""

    certs_dir: Path
    ca_file: Path
    token_secret_file: Path
    names: tuple[str, ...]

    def cert_file(self, name: str) -> Path:
        return self.certs_dir / f"{name}.pem"

    def key_file(self, name: str) -> Path:
        return self.certs_dir / f"{name}.key"


def _now() -> datetime.datetime:
    return datetime.datetime.fromtimestamp(_env.wall_time(), datetime.UTC)


def new_authority(common_name: str = CA_NAME_DEFAULT, *, days: int = DAYS_DEFAULT) -> Authority:
    """A fresh self-signed CA valid for ``days``."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _now()
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Authority(certificate, key)


def issue(
    authority: Authority,
    common_name: str,
    *,
    days: int = DAYS_DEFAULT,
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A leaf certificate ``CN=common_name`` signed by ``authority`` (for servers and clients)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    alt_names: list[x509.GeneralName] = [
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ]
    if _DNS_LABEL.match(common_name) and common_name != "localhost":
        alt_names.insert(0, x509.DNSName(common_name))
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(authority.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or now - datetime.timedelta(hours=1))
        .not_valid_after(not_after or now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(authority.key.public_key()), critical=False)
        .sign(authority.key, hashes.SHA256())
    )
    return certificate, key


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.chmod(path, 0o600)


def write_certificate(path: Path, certificate: x509.Certificate) -> None:
    path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))


def write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    _write_private(
        path,
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    )


def write_leaf(
    authority: Authority,
    certs_dir: Path,
    name: str,
    *,
    days: int = DAYS_DEFAULT,
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
) -> tuple[Path, Path]:
    """Issue ``name``'s certificate and write ``<name>.pem`` / ``<name>.key`` in ``certs_dir``."""
    certificate, key = issue(authority, name, days=days, not_before=not_before, not_after=not_after)
    cert_file, key_file = certs_dir / f"{name}.pem", certs_dir / f"{name}.key"
    write_certificate(cert_file, certificate)
    write_key(key_file, key)
    return cert_file, key_file


def make_dev_certs(
    out_dir: str | os.PathLike[str],
    names: Iterable[str],
    *,
    days: int = DAYS_DEFAULT,
    ca_name: str = CA_NAME_DEFAULT,
) -> DevCerts:
    """Create ``out_dir`` with ``ca.pem``/``ca.key`` (a new local CA), ``<name>.pem`` /
    ``<name>.key`` for each name, and ``token.secret`` (32 random bytes, hex) for
    HMAC bearer tokens. Existing files of those names are replaced."""
    certs_dir = Path(out_dir)
    certs_dir.mkdir(parents=True, exist_ok=True)
    unique = tuple(dict.fromkeys(names))
    for name in unique:
        if not name or "/" in name or name.startswith(".") or name in ("ca", "token"):
            raise ValueError(f"{name!r} cannot be a certificate name")
    authority = new_authority(ca_name, days=days)
    ca_file = certs_dir / "ca.pem"
    write_certificate(ca_file, authority.certificate)
    write_key(certs_dir / "ca.key", authority.key)
    for name in unique:
        write_leaf(authority, certs_dir, name, days=days)
    secret_file = certs_dir / "token.secret"
    _write_private(secret_file, (secrets.token_hex(TOKEN_SECRET_BYTES) + "\n").encode())
    return DevCerts(certs_dir, ca_file, secret_file, unique)


def load_authority(certs_dir: str | os.PathLike[str]) -> Authority:
    """The CA that :func:`make_dev_certs` wrote in ``certs_dir`` (to issue more certificates)."""
    directory = Path(certs_dir)
    certificate = x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())
    key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{directory / 'ca.key'} is not an EC private key")
    return Authority(certificate, key)
