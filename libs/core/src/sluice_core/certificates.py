"""The local certificate authority: a certificate for each of sluice's identities, for mutual TLS.

Every process that takes part in sluice's internal network has an identity,
a SPIFFE-style URI (``spiffe://sluice.local/queue``) in its certificate.
Envoy checks a service's certificate against the identity its cluster
expects, and decides which identities may call which internal route (its
RBAC filter); a service accepts only callers with a certificate from this
authority. ``ensure`` makes the authority and the certificates on first use
and again when one nears its end; an operator with a CA of their own puts
its files in the folder instead (``README.md``, security model).

The keys are ECDSA P-256, made by ``cryptography``; nothing here is
hand-rolled.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sluice_core.tls import TlsFiles

TRUST_DOMAIN = "sluice.local"
# Each process of the stack, and the operator's tools (``sluice admin``, the local stack's probes).
IDENTITIES = ("envoy", "queue", "inference", "datastore", "ratelimit", "openai", "admin")
# Where a process is reached, for clients that check the name they dialled (gRPC does).
_HOST_NAMES = ("localhost",)
_ADDRESSES = (ipaddress.ip_address("127.0.0.1"),)

_VALID = datetime.timedelta(days=365)
_RENEW_BEFORE = datetime.timedelta(days=30)


def spiffe_id(identity: str) -> str:
    return f"spiffe://{TRUST_DOMAIN}/{identity}"


def files(folder: Path, identity: str) -> TlsFiles:
    """``identity``'s files in ``folder`` (as ``ensure`` makes them)."""
    return TlsFiles(folder / "ca.pem", folder / f"{identity}.pem", folder / f"{identity}-key.pem")


def ensure(folder: Path, identities: tuple[str, ...] = IDENTITIES) -> None:
    """The authority and a certificate for each identity in ``folder``, made where missing or near their end."""
    folder.mkdir(parents=True, exist_ok=True)
    ca_cert_path, ca_key_path = folder / "ca.pem", folder / "ca-key.pem"
    now = datetime.datetime.now(datetime.UTC)
    if _lasting(ca_cert_path, now) and ca_key_path.is_file():
        ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
        assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
        ca_cert = x509.load_pem_x509_certificate(ca_cert_path.read_bytes())
        renew_all = False
    else:
        ca_key, ca_cert = _authority(now)
        _write_key(ca_key_path, ca_key)
        ca_cert_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
        renew_all = True  # signed by the old authority: no longer trusted
    for identity in identities:
        paths = files(folder, identity)
        if renew_all or not _lasting(paths.cert, now) or not paths.key.is_file():
            key = ec.generate_private_key(ec.SECP256R1())
            _write_key(paths.key, key)
            paths.cert.write_bytes(_issue(identity, key, ca_key, ca_cert, now).public_bytes(serialization.Encoding.PEM))


def _lasting(cert_path: Path, now: datetime.datetime) -> bool:
    if not cert_path.is_file():
        return False
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    return cert.not_valid_after_utc - now > _RENEW_BEFORE


def _authority(now: datetime.datetime) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sluice local CA")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + _VALID)
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
        )  # fmt: skip
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _issue(
    identity: str,
    key: ec.EllipticCurvePrivateKey,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    now: datetime.datetime,
) -> x509.Certificate:
    names: list[x509.GeneralName] = [
        x509.UniformResourceIdentifier(spiffe_id(identity)),
        # Compose reaches each service by its name.
        x509.DNSName(identity),
        *(x509.DNSName(host) for host in _HOST_NAMES),
        *(x509.IPAddress(address) for address in _ADDRESSES),
    ]
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + _VALID)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    """A private key, readable by its owner alone."""
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(pem)


def hand_over(folder: Path, owners: dict[str, int]) -> None:
    """Each identity's key and certificate to the user its process runs as (``"*"``: the rest), the
    authority's certificate to everyone, its key to nobody but the one who made it."""
    for identity in IDENTITIES:
        uid = owners.get(identity, owners.get("*"))
        if uid is not None:
            paths = files(folder, identity)
            for path in (paths.cert, paths.key):
                os.chown(path, uid, uid)
    (folder / "ca.pem").chmod(0o644)


def main() -> None:
    """``python -m sluice_core.certificates FOLDER``: what compose's one-shot ``certificates`` service runs."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument(
        "--owner",
        action="append",
        default=[],
        metavar="IDENTITY=UID",
        help="give an identity's files to the user its container runs as (* for every other identity)",
    )
    args = parser.parse_args()
    ensure(args.folder)
    hand_over(args.folder, {name: int(uid) for name, _, uid in (owner.partition("=") for owner in args.owner)})


if __name__ == "__main__":
    main()
