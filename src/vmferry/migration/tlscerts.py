"""Test credentials for migration over TLS: a CA and a host's certificates (labs, tests).

A CA directory holds ``ca-cert.pem`` and ``ca-key.pem`` and is made on first use, so the
hosts of one lab share it; another CA directory is another CA. A credentials directory
gets QEMU's five files: the CA certificate, a server certificate whose subjectAltName
lists the host names and addresses, and a client certificate whose common name is the
client identity that ``tls-authz`` admits. Keys are ECDSA P-256 (fast handshakes) and
written mode 0600. Real deployments make these with their own PKI (docs/tls.md).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from vmferry.errors import ConfigError
from vmferry.migration.tls import CA_CERT, CLIENT_CERT, CLIENT_KEY, SERVER_CERT, SERVER_KEY

CA_KEY = "ca-key.pem"
DEFAULT_DAYS = 365
CREDS_FILES = (CA_CERT, SERVER_CERT, SERVER_KEY, CLIENT_CERT, CLIENT_KEY)
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


@dataclass(frozen=True)
class Authority:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "vmferry test"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def _write(path: Path, data: bytes, private: bool) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    try:
        os.fchmod(fd, 0o600 if private else 0o644)  # an existing file keeps its mode otherwise
        os.write(fd, data)
    finally:
        os.close(fd)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def check_ca_dir(directory: Path) -> None:
    """Refuse a --ca that is not a CA's own directory: making a CA there would replace a
    host's ca-cert.pem (its trust) or mix a CA key into its credentials."""
    cert_path, key_path = directory / CA_CERT, directory / CA_KEY
    if cert_path.exists() and not key_path.exists():
        raise ConfigError(
            f"--ca {directory}: {cert_path} is a CA certificate without its key: a host's "
            "credentials directory? give the CA's own directory"
        )
    if key_path.exists() and not cert_path.exists():
        raise ConfigError(f"--ca {directory}: {key_path} has no {CA_CERT} beside it")
    host_files = [n for n in CREDS_FILES[1:] if (directory / n).exists()]
    if host_files:
        raise ConfigError(
            f"--ca {directory}: holds a host's credentials ({', '.join(host_files)}); "
            "give the CA's own directory"
        )


def check_host(host: str) -> None:
    """A --host is an IP address or an RFC 1123 host name (what a SAN entry can match)."""
    try:
        ipaddress.ip_address(host)
        return
    except ValueError:
        pass
    name = host[:-1] if host.endswith(".") else host
    labels = name.split(".")
    if not name or len(name) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        raise ConfigError(
            f"--host {host!r}: not an IP address or a host name (letters, digits, "
            "hyphens and dots; RFC 1123)"
        )


def load_or_make_ca(directory: Path, name: str = "vmferry test CA") -> Authority:
    """The CA in ``directory``, made there (valid ten years) if it is not there yet."""
    check_ca_dir(directory)
    cert_path, key_path = directory / CA_CERT, directory / CA_KEY
    if cert_path.exists() and key_path.exists():
        try:
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        except ValueError as e:
            raise ConfigError(f"{directory}: not a usable CA ({e})") from e
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ConfigError(f"{key_path}: expected an EC private key (made by vmferry)")
        return Authority(cert, key)
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(_name(name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
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
    _write(key_path, _key_pem(key), private=True)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), private=False)
    return Authority(cert, key)


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    return x509.SubjectAlternativeName(names)


def _leaf(
    ca: Authority, cn: str, hosts: list[str] | None, server: bool, days: int, expired: bool
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    if expired:  # for tests: a certificate whose validity ended yesterday
        start, end = now - datetime.timedelta(days=days + 1), now - datetime.timedelta(days=1)
    else:
        start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
    )
    if hosts:
        builder = builder.add_extension(_san(hosts), critical=False)
    return builder.sign(ca.key, hashes.SHA256()), key


def make_creds(
    directory: Path,
    ca_dir: Path,
    hosts: list[str],
    client_name: str = "",
    *,
    days: int = DEFAULT_DAYS,
    expired: bool = False,
    force: bool = False,
) -> list[Path]:
    """QEMU's five files in ``directory``, signed by the CA in ``ca_dir``; the paths.
    Files already in ``directory`` are replaced only with ``force``."""
    if not hosts:
        raise ConfigError("make-creds needs at least one --host (the name sources connect to)")
    for host in hosts:
        check_host(host)
    if days < 1:
        raise ConfigError(f"--days {days}: a certificate must be valid at least one day")
    if directory.resolve() == ca_dir.resolve():
        raise ConfigError(f"{directory}: the credentials directory must not be the CA's (--ca)")
    if (directory / CA_KEY).exists():
        raise ConfigError(f"{directory} holds {CA_KEY}: it is a CA's directory, not a host's")
    existing = [n for n in CREDS_FILES if (directory / n).exists()]
    if existing and not force:
        raise ConfigError(
            f"{directory} already holds credentials ({', '.join(existing)}); "
            "give --force to replace them"
        )
    ca = load_or_make_ca(ca_dir)
    directory.mkdir(parents=True, exist_ok=True)
    server, server_key = _leaf(ca, hosts[0], hosts, True, days, expired)
    client, client_key = _leaf(ca, client_name or hosts[0], None, False, days, expired)
    pem = serialization.Encoding.PEM
    files = [
        (CA_CERT, ca.cert.public_bytes(pem), False),
        (SERVER_CERT, server.public_bytes(pem), False),
        (SERVER_KEY, _key_pem(server_key), True),
        (CLIENT_CERT, client.public_bytes(pem), False),
        (CLIENT_KEY, _key_pem(client_key), True),
    ]
    for name, data, private in files:
        _write(directory / name, data, private)
    return [directory / name for name, _, _ in files]
