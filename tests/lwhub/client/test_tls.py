"""https stays verified although the client builds its TLS context only on first use.

A real TLS server on 127.0.0.1 presents a certificate issued by a private CA made here:
it is refused unless that CA is trusted (through SSL_CERT_FILE, as httpx reads it), and
refused for a name it was not issued for, by the API calls and by blob downloads alike.
"""

import datetime
import hashlib
import ipaddress
import json
import ssl
import threading
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from lwhub.client import Client
from lwhub.client.download import Fetcher, FileJob
from lwhub.client.tls import LazyTLS
from lwhub.errors import HubUnavailableError

BLOB = bytes(range(256)) * 64
HEX = hashlib.sha256(BLOB).hexdigest()


def _cert(subject: str, key, issuer_name: x509.Name, issuer_key, *, ca: bool, san: x509.GeneralName | None = None):
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        ).add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    else:
        builder = builder.add_extension(x509.SubjectAlternativeName([san]), critical=False).add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False
        )
    return builder.sign(issuer_key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A private CA (ca.pem) and two server certificates: for 127.0.0.1, and for another name."""
    root = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "lwhub test CA")])
    ca = _cert("lwhub test CA", ca_key, ca_name, ca_key, ca=True)
    (root / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for name, san in [("ip", x509.IPAddress(ipaddress.ip_address("127.0.0.1"))), ("other", x509.DNSName("elsewhere.example"))]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _cert(name, key, ca_name, ca_key, ca=False, san=san)
        (root / f"{name}.pem").write_bytes(
            cert.public_bytes(serialization.Encoding.PEM)
            + key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        )
    return root


class Answer(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        body = BLOB if self.path.startswith("/v1/blobs/") else json.dumps({"ok": True}).encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(params=["ip", "other"])
def tls_hub(request, pki):
    """(url, whether the certificate names 127.0.0.1) of an https server on a loopback port."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), Answer)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki / f"{request.param}.pem")
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"https://127.0.0.1:{server.server_address[1]}", request.param == "ip"
    server.shutdown()
    server.server_close()


@pytest.fixture(autouse=True)
def no_ca_from_env(monkeypatch):
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)


def _download(client: Client) -> bytes:
    job = FileJob("blob", HEX, len(BLOB), (HEX,), 1 << 16)
    with ThreadPoolExecutor(2) as pool:  # direct=True: only plain http may skip httpx
        Fetcher(client.http, client.cache, client.blob_url, pool, direct=True).fetch([job])
    return client.cache.blob(HEX).read_bytes()


def test_a_certificate_from_an_untrusted_ca_is_refused(tls_hub, tmp_path):
    url, _ = tls_hub
    with Client(url, cache_dir=tmp_path) as client:
        with pytest.raises(HubUnavailableError, match="CERTIFICATE_VERIFY_FAILED"):
            client.get("/v1/health", dict)
        with pytest.raises(HubUnavailableError, match="CERTIFICATE_VERIFY_FAILED"):
            _download(client)
    assert not client.cache.blob(HEX).exists()


def test_a_ca_named_by_ssl_cert_file_is_trusted_for_the_names_it_certified(tls_hub, pki, tmp_path, monkeypatch):
    url, names_this_host = tls_hub
    monkeypatch.setenv("SSL_CERT_FILE", str(pki / "ca.pem"))
    with Client(url, cache_dir=tmp_path) as client:
        if names_this_host:
            assert client.get("/v1/health", dict) == {"ok": True}
            assert _download(client) == BLOB
        else:  # a valid certificate, for another host name
            with pytest.raises(HubUnavailableError, match="CERTIFICATE_VERIFY_FAILED"):
                client.get("/v1/health", dict)
            with pytest.raises(HubUnavailableError, match="CERTIFICATE_VERIFY_FAILED"):
                _download(client)


def test_the_context_is_built_on_first_use_and_verifies():
    lazy = LazyTLS()
    assert not lazy.built
    assert lazy.verify_mode == ssl.CERT_REQUIRED and lazy.check_hostname
    assert lazy.built
