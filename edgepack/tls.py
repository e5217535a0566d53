"""A private certificate authority for the update server's HTTPS and the broker's TLS listener.

``edgepack tls init --out DIR --host updates.example.com`` writes::

    DIR/ca.pem       the CA certificate: install it on every device ([server] ca_file, [mqtt] ca_file)
    DIR/ca.key       the CA's private key (0600): keep it offline; only `edgepack tls issue` needs it
    DIR/server.pem   the update server's certificate + key (edgepack-server tls_cert / tls_key)
    DIR/server.key
    DIR/broker.pem   the broker's certificate + key (mosquitto certfile / keyfile)
    DIR/broker.key

Keys are ECDSA P-256; certificates carry the host names and IP addresses given as subject alternative
names (clients check them), ``serverAuth`` usage, 365 days by default (``edgepack tls issue`` renews one
from the same CA; devices keep trusting the CA). Everything is done with ``cryptography``.
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

from bundles._util import atomic_write  # temp file (0600 until chmod), fsync, rename

CA_DAYS = 3650
LEAF_DAYS = 365


class TlsError(Exception):
    """A CA or certificate could not be made; the message says what to do."""


@dataclass(frozen=True)
class TlsFiles:
    """Where ``edgepack tls init`` put things."""

    dir: Path

    @property
    def ca_cert(self) -> Path:
        return self.dir / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.dir / "ca.key"

    def cert(self, name: str) -> Path:
        return self.dir / f"{name}.pem"

    def key(self, name: str) -> Path:
        return self.dir / f"{name}.key"


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "edgepack"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def init_ca(out: Path, *, common_name: str = "edgepack local CA", days: int = CA_DAYS,
            now: dt.datetime | None = None) -> TlsFiles:
    """Create the CA in ``out``. Refuses to replace an existing one (devices trust it)."""
    files = TlsFiles(out)
    if files.ca_cert.exists() or files.ca_key.exists():
        raise TlsError(f"{files.ca_cert} already exists; devices trust that CA. Issue new certificates from it "
                       "with `edgepack tls issue`, or choose another directory")
    out.mkdir(parents=True, exist_ok=True)
    now = now or dt.datetime.now(dt.timezone.utc)
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name(common_name)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    atomic_write(files.ca_key, _key_pem(key), 0o600)
    atomic_write(files.ca_cert, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return files


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def issue(files: TlsFiles, name: str, hosts: list[str], *, days: int = LEAF_DAYS,
          now: dt.datetime | None = None) -> tuple[Path, Path]:
    """(Re-)issue ``<name>.pem``/``<name>.key`` for ``hosts`` (DNS names or IP addresses), signed by the CA."""
    if not hosts:
        raise TlsError(f"the {name} certificate needs at least one host name or IP address (--host)")
    try:
        ca_key = serialization.load_pem_private_key(files.ca_key.read_bytes(), password=None)
        ca_cert = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    except FileNotFoundError as exc:
        raise TlsError(f"no CA in {files.dir} ({exc.filename} missing); run `edgepack tls init` first") from exc
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise TlsError(f"{files.ca_key} is not an ECDSA key written by edgepack tls init")
    now = now or dt.datetime.now(dt.timezone.utc)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(_name(hosts[0])).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_san(hosts), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    atomic_write(files.key(name), _key_pem(key), 0o600)
    atomic_write(files.cert(name), cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return files.cert(name), files.key(name)


def init(out: Path, *, hosts: list[str], broker_hosts: list[str] | None = None,
         days: int = LEAF_DAYS) -> TlsFiles:
    """CA + ``server`` certificate for ``hosts`` + ``broker`` certificate for ``broker_hosts`` (default: hosts)."""
    files = init_ca(out)
    issue(files, "server", hosts, days=days)
    issue(files, "broker", broker_hosts or hosts, days=days)
    return files


def expires(cert: Path) -> dt.datetime:
    return x509.load_pem_x509_certificate(cert.read_bytes()).not_valid_after_utc
