# -*- test-case-name: tests.test_iot_tls -*-
"""
The TLS listener of devices and centrals (C{iot.tls}): plain TCP
endpoints the face wraps in TLS with a configured certificate or, with
none, a development certificate generated on first start.

The development certificate is self-signed for C{localhost} and
127.0.0.1, and created like the generated keys (L{broker.files}): mode
0600 under C{state_dir}, never in the repository.  A client trusts it by
pinning it (L{broker.iot.client.pinnedTLS}); a production broker names
a certificate issued for its host name instead (docs/iot.md).
"""

import datetime
import fcntl
import os

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import ssl
from twisted.protocols.tls import TLSMemoryBIOFactory

from broker.files import openPrivate, writePrivate

CERT_FILE = "iot-tls-cert.pem"
KEY_FILE = "iot-tls-key.pem"
DEV_NAMES = ("localhost",)
DEV_ADDRESSES = ("127.0.0.1", "::1")
DEV_DAYS = 825


def writeDevelopmentCertificate(certPath, keyPath, clock=None):
    """
    Create a self-signed certificate and its key (ECDSA P-256), both mode
    0600, unless C{certPath} exists.  Under a lock file beside them, so
    that worker processes starting together (C{cluster.workers}) agree on
    one pair.

    @return: True if they were created.
    """
    if os.path.exists(certPath):
        return False
    fd = openPrivate(certPath + ".lock")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        if os.path.exists(certPath):
            return False
        _write(certPath, keyPath, clock)
        return True
    finally:
        os.close(fd)


def _write(certPath, keyPath, clock):
    import ipaddress
    now = datetime.datetime.now(datetime.timezone.utc) if clock is None else clock
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "broker iot development")])
    alt = [x509.DNSName(n) for n in DEV_NAMES] + [
        x509.IPAddress(ipaddress.ip_address(a)) for a in DEV_ADDRESSES]
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=DEV_DAYS))
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(key, hashes.SHA256()))
    writePrivate(keyPath, key.private_bytes(serialization.Encoding.PEM,
                                            serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption()))
    writePrivate(certPath, cert.public_bytes(serialization.Encoding.PEM))


def certificatePaths(cfg, stateDir):
    """
    C{(certificate, private key, generated)}: the configured files, or
    the development pair in C{stateDir} (created if missing).
    """
    tls = cfg["tls"]
    if tls["certificate"]:
        return tls["certificate"], tls["private_key"] or tls["certificate"], False
    certPath = os.path.join(stateDir, CERT_FILE)
    keyPath = os.path.join(stateDir, KEY_FILE)
    generated = writeDevelopmentCertificate(certPath, keyPath)
    return certPath, keyPath, generated


def serverOptions(certPath, keyPath):
    """
    The server's TLS options from PEM files (the certificate file may hold
    the chain after the leaf).
    """
    with open(certPath, "rb") as f:
        certPEM = f.read()
    with open(keyPath, "rb") as f:
        keyPEM = f.read()
    cert = ssl.PrivateCertificate.loadPEM(keyPEM + b"\n" + certPEM.split(
        b"-----END CERTIFICATE-----")[0] + b"-----END CERTIFICATE-----\n")
    chain = [ssl.Certificate.loadPEM(c + b"-----END CERTIFICATE-----\n").original
             for c in certPEM.split(b"-----END CERTIFICATE-----")[1:] if c.strip()]
    return ssl.CertificateOptions(privateKey=cert.privateKey.original,
                                  certificate=cert.original, extraCertChain=chain or None)


def wrap(factory, options):
    """
    C{factory} behind TLS: what a plain TCP endpoint listens with.
    """
    return TLSMemoryBIOFactory(options, False, factory)
