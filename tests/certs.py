"""
Certificate authorities and certificates that a test makes, written as
PEM files, and a fake ML host behind real TLS on 127.0.0.1.
"""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path
from typing import Optional

from attrs import frozen
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.internet.endpoints import SSL4ServerEndpoint
from twisted.internet.ssl import Certificate, CertificateOptions, PrivateCertificate

_DAY = datetime.timedelta(days=1)


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


@frozen
class Issued:
    """
    A certificate and its key, as PEM.
    """

    cert: bytes
    key: bytes

    def write(self, directory: Path, stem: str) -> tuple[str, str]:
        """
        Write C{stem.pem} (the certificate) and C{stem.key}; their paths.
        """
        cert, key = directory / f"{stem}.pem", directory / f"{stem}.key"
        cert.write_bytes(self.cert)
        key.write_bytes(self.key)
        return str(cert), str(key)

    def private(self) -> PrivateCertificate:
        return PrivateCertificate.loadPEM(self.cert + self.key)


@frozen(eq=False)
class Authority:
    """
    A certificate authority of a test's own.
    """

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @classmethod
    def make(cls, name: str = "imml test CA") -> Authority:
        key = _key()
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(_name(name))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _DAY)
            .not_valid_after(now + _DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256())
        )
        return cls(key, cert)

    @property
    def pem(self) -> bytes:
        return _cert_pem(self.cert)

    def write(self, directory: Path, stem: str = "ca") -> str:
        """
        Write the CA's certificate as C{stem.pem}; its path.
        """
        path = directory / f"{stem}.pem"
        path.write_bytes(self.pem)
        return str(path)

    def issue(self, common: str, ip: Optional[str] = None, dns: Optional[str] = None, client: bool = False) -> Issued:
        """
        A certificate for a server at C{ip} or named C{dns}, or (C{client})
        for a client.
        """
        key = _key()
        now = datetime.datetime.now(datetime.timezone.utc)
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _DAY)
            .not_valid_after(now + _DAY)
        )
        names: list[x509.GeneralName] = []
        if ip is not None:
            names.append(x509.IPAddress(ipaddress.ip_address(ip)))
        if dns is not None:
            names.append(x509.DNSName(dns))
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        return Issued(_cert_pem(builder.sign(self.key, hashes.SHA256())), _key_pem(key))


def tls_endpoint(reactor, server: Issued, clients: Optional[Authority] = None) -> SSL4ServerEndpoint:
    """
    Where a fake ML host listens behind TLS on 127.0.0.1 with C{server}'s
    certificate; with C{clients}, it demands a client certificate that
    authority issued.
    """
    mine = server.private()
    if clients is None:
        options = CertificateOptions(privateKey=mine.privateKey.original, certificate=mine.original)
    else:
        options = CertificateOptions(
            privateKey=mine.privateKey.original,
            certificate=mine.original,
            verify=True,
            requireCertificate=True,
            caCerts=[Certificate.loadPEM(clients.pem).original],
        )
    return SSL4ServerEndpoint(reactor, 0, options, interface="127.0.0.1")
