"""A throwaway certificate authority for tests, made at test time: a CA and one server certificate for 127.0.0.1 and
localhost that it signed, written as PEM files for servers (redis-server's `--tls-*-file`) and clients
(`?ssl_ca_certs=`). Nothing is trusted by the machine: a client that is not given `ca_cert` cannot verify the server.

Made with `cryptography` (a dependency of fluxrt through `pyjwt[crypto]`); EC P-256 keys, so that making one takes a
few milliseconds.
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from pathlib import Path

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_VALID = datetime.timedelta(days=1)


@attrs.frozen
class ThrowawayCA:
    """The PEM files of one throwaway CA and of the server certificate it signed; it can sign more."""

    ca_cert: Path
    server_cert: Path
    """for CN fluxrt-test-server, valid for IP 127.0.0.1 and DNS localhost, for server and client authentication
    (a Redis replica presents it to its primary)"""
    server_key: Path
    key: ec.EllipticCurvePrivateKey = attrs.field(repr=False)
    certificate: x509.Certificate = attrs.field(repr=False)

    def client_context(self) -> ssl.SSLContext:
        """A client context that trusts this CA only and checks host names."""
        return ssl.create_default_context(cafile=str(self.ca_cert))

    def server_settings(self) -> dict[str, str]:
        """fluxrt's `server.tls_cert_file` and `server.tls_key_file` for the server certificate."""
        return {"tls_cert_file": str(self.server_cert), "tls_key_file": str(self.server_key)}

    def reissue_server(self, common_name: str) -> None:
        """Write a new server certificate (and key) named `common_name` over the server's files: a rotation."""
        key = ec.generate_private_key(ec.SECP256R1())
        self.server_cert.write_bytes(self._sign(key, common_name, server=True).public_bytes(serialization.Encoding.PEM))
        _write_key(self.server_key, key)

    def issue_client(self, directory: Path, common_name: str) -> tuple[Path, Path]:
        """A client certificate and its key signed by this CA, as `<common_name>.pem` and `<common_name>-key.pem`."""
        key = ec.generate_private_key(ec.SECP256R1())
        cert_path, key_path = directory / f"{common_name}.pem", directory / f"{common_name}-key.pem"
        cert_path.write_bytes(self._sign(key, common_name, server=False).public_bytes(serialization.Encoding.PEM))
        _write_key(key_path, key)
        return cert_path, key_path

    def _sign(self, key: ec.EllipticCurvePrivateKey, common_name: str, *, server: bool) -> x509.Certificate:
        now = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=1)
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + _VALID)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                    if server
                    else [ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
                ),
                critical=False,
            )
        return builder.sign(self.key, hashes.SHA256())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    path.chmod(0o600)


def make_ca(directory: Path, name: str = "fluxrt test CA") -> ThrowawayCA:
    """Create a CA named `name` and a server certificate it signed, valid from a minute ago for a day, as
    `ca.pem`, `server.pem` and `server-key.pem` in `directory` (created if missing; files there are replaced)."""
    directory.mkdir(parents=True, exist_ok=True)
    # A minute back, so that a clock a little behind on the verifying side still accepts them.
    now = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=1)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(_name(name))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + _VALID)
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
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    ca = ThrowawayCA(
        ca_cert=directory / "ca.pem",
        server_cert=directory / "server.pem",
        server_key=directory / "server-key.pem",
        key=ca_key,
        certificate=ca_cert,
    )
    ca.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    ca.reissue_server("fluxrt-test-server")
    return ca
