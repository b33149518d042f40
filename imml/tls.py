"""
TLS to ML hosts written C{https://}: what each host's connection trusts
and presents (L{TLSSettings}, read from PEM files by L{load_tls}), the
connection creators made from them (L{HostsPolicy}, an
L{IPolicyForHTTPS}), and why a host's certificate was refused, in words
(L{CertificateRejected}, L{describe_tls}).

A host is verified against the system's CAs unless a CA file is given for
it (C{ca} in the configuration file, C{--ca-file} for all); its
certificate must name the host as written (a DNS name, or an IP address in
its subject alternative names).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from attrs import field, frozen
from OpenSSL import SSL
from OpenSSL.crypto import X509
from service_identity import VerificationError
from service_identity.cryptography import verify_certificate_hostname, verify_certificate_ip_address
from service_identity.exceptions import CertificateError
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.ssl import (
    Certificate,
    PrivateCertificate,
    optionsForClientTLS,
    platformTrust,
    trustRootFromCertificates,
)
from twisted.python.failure import Failure
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

#: OpenSSL's words for the certificate verification errors a balancer
#: meets (the X509_V_ERR_* numbers are stable across OpenSSL versions).
_VERIFY_ERRORS = {
    2: "unable to get issuer certificate",
    7: "certificate signature failure",
    9: "certificate is not yet valid",
    10: "certificate has expired",
    18: "self-signed certificate",
    19: "self-signed certificate in certificate chain",
    20: "unable to get local issuer certificate",
    21: "unable to verify the first certificate",
    23: "certificate revoked",
    24: "invalid CA certificate",
    26: "unsupported certificate purpose",
    27: "certificate not trusted",
    28: "certificate rejected",
}


class TLSError(ValueError):
    """
    A CA file, certificate or key cannot be used; the message names the
    file and says why.
    """


class CertificateRejected(Exception):
    """
    A host's certificate did not verify; the message says why, as
    C{certificate verify failed: <OpenSSL's reason>}.
    """


@frozen
class TLSSettings:
    """
    How to make TLS connections to one host.

    @ivar ca: the CA file's path, or None for the system's CAs.
    @ivar authorities: the PEM certificates of the CA file (empty: the
        system's CAs).
    @ivar cert: the client certificate's path, or None for none.
    @ivar client: the client certificate and its key, PEM, or None.
    """

    ca: Optional[str] = None
    authorities: bytes = field(default=b"", repr=False)
    cert: Optional[str] = None
    client: Optional[bytes] = field(default=None, repr=False)

    def with_ca(self, other: TLSSettings) -> TLSSettings:
        """
        These settings, trusting C{other}'s CAs unless they name their own.
        """
        if self.ca is not None:
            return self
        return TLSSettings(other.ca, other.authorities, self.cert, self.client)

    def describe(self) -> dict:
        """
        What the status page shows: the CA file (or C{"system"}) and the
        client certificate's file, never a key.
        """
        return {"ca": self.ca or "system", "cert": self.cert}


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise TLSError(f"{what} {path}: cannot read it: {e.strerror}") from None


def load_tls(ca: Optional[str] = None, cert: Optional[str] = None, key: Optional[str] = None) -> TLSSettings:
    """
    Read a host's CA file and client certificate (PEM).  C{key} may be
    left out when the certificate's file holds the key too.

    @raise TLSError: naming the file when one cannot be read or used.
    """
    authorities = b""
    if ca is not None:
        authorities = _read(ca, "CA file")
        try:
            trustRootFromCertificates([Certificate.loadPEM(authorities)])
        except Exception:
            raise TLSError(f"CA file {ca}: no PEM certificate in it") from None
    client = None
    if key is not None and cert is None:
        raise TLSError(f"key {key}: a key needs its certificate (cert)")
    if cert is not None:
        client = _read(cert, "certificate")
        if key is not None:
            client += b"\n" + _read(key, "key")
        try:
            PrivateCertificate.loadPEM(client)
        except Exception:
            raise TLSError(
                f"certificate {cert}: not a PEM certificate with its private key"
                + ("" if key is not None else " (give the key with key = ...)")
            ) from None
    return TLSSettings(ca, authorities, cert, client)


def _authorities(pem: bytes) -> list[Certificate]:
    """
    Every certificate in a PEM bundle.
    """
    marker = b"-----END CERTIFICATE-----"
    return [Certificate.loadPEM(part + marker) for part in pem.split(marker) if b"-----BEGIN" in part]


def _matches(cert: X509, hostname: str) -> None:
    """
    Raise L{VerificationError} unless C{cert} is for C{hostname}.
    """
    if isIPAddress(hostname) or isIPv6Address(hostname):
        verify_certificate_ip_address(cert.to_cryptography(), hostname)
    else:
        verify_certificate_hostname(cert.to_cryptography(), hostname)


@implementer(IOpenSSLClientConnectionCreator)
class _Explained:
    """
    A connection creator (from L{optionsForClientTLS}) whose connections,
    when the host's certificate does not verify, fail with a
    L{CertificateRejected} that says why rather than OpenSSL's bare
    C{certificate verify failed}.  It checks what Twisted's own creator
    checks: the chain, then the host's name in the certificate.
    """

    def __init__(self, hostname: str, creator: Any) -> None:
        self._hostname = hostname
        self._creator = creator

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        connection = self._creator.clientConnectionForTLS(tlsProtocol)
        hostname = self._hostname
        # The protocol, until the leaf is checked: then no reference to it
        # remains from its own connection (as Twisted's creator does).
        protocol = [tlsProtocol]

        def verify(conn: SSL.Connection, cert: X509, error: int, depth: int, ok: int) -> bool:
            reason = None
            if not ok:
                reason = _VERIFY_ERRORS.get(error, f"error {error}")
            elif depth == 0:
                try:
                    _matches(cert, hostname)
                except (VerificationError, CertificateError):
                    reason = f"the certificate is not for {hostname}"
            if reason is None:
                if depth == 0:
                    protocol.clear()
                return True
            if protocol:
                rejected = CertificateRejected(f"certificate verify failed: {reason}")
                protocol.pop().failVerification(Failure(rejected))
            return False

        connection.set_verify(connection.get_verify_mode(), verify)
        return connection


def creator_for(hostname: str, settings: TLSSettings) -> IOpenSSLClientConnectionCreator:
    """
    The connection creator for C{hostname} with C{settings}.
    """
    trust = trustRootFromCertificates(_authorities(settings.authorities)) if settings.authorities else platformTrust()
    client = PrivateCertificate.loadPEM(settings.client) if settings.client is not None else None
    return _Explained(hostname, optionsForClientTLS(hostname, trustRoot=trust, clientCertificate=client))


@implementer(IPolicyForHTTPS)
class HostsPolicy:
    """
    Each host's TLS settings, as connection creators: one per host, made
    when first needed and again when its settings change.

    @ivar settings_for: the settings of the host at a name and port, or
        None for the default.
    @ivar default: the settings of a host that has none of its own.
    """

    def __init__(
        self, settings_for: Callable[[str, int], Optional[TLSSettings]], default: TLSSettings = TLSSettings()
    ) -> None:
        self.settings_for = settings_for
        self.default = default
        self._creators: dict[tuple[str, int], tuple[TLSSettings, IOpenSSLClientConnectionCreator]] = {}

    def creatorForNetloc(self, hostname: bytes, port: int) -> IOpenSSLClientConnectionCreator:
        host = hostname.decode("ascii")
        settings = self.settings_for(host, port) or self.default
        known = self._creators.get((host, port))
        if known is not None and known[0] == settings:
            return known[1]
        creator = creator_for(host, settings)
        self._creators[(host, port)] = (settings, creator)
        return creator


def describe_tls(error: BaseException) -> Optional[str]:
    """
    Why a TLS connection failed, in a short phrase, or None when C{error}
    is not a TLS failure.
    """
    if isinstance(error, CertificateRejected):
        return str(error)
    if isinstance(error, SSL.Error):
        details = [part[2] for part in (error.args[0] if error.args else []) if len(part) > 2 and part[2]]
        return "TLS handshake failed" + (f": {details[0]}" if details else "")
    return None


__all__ = [
    "CertificateRejected",
    "HostsPolicy",
    "TLSError",
    "TLSSettings",
    "creator_for",
    "describe_tls",
    "load_tls",
]
