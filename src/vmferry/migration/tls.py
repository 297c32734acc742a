"""TLS for migration: the x509 credentials directory, contexts, handshakes, tls-authz.

The directory holds QEMU's file names (``ca-cert.pem``, ``server-cert.pem``,
``server-key.pem``, ``client-cert.pem``, ``client-key.pem``); a destination needs the CA
and the server pair, a source the CA and the client pair. Both sides verify each other
(TLS 1.3 only). ``tls-authz`` is a comma-separated list of client certificate subject
common names the destination admits; empty admits any certificate its CA signed.

After the handshake the destination sends one JSON line on every connection: ``tls-ok``,
or ``failed`` with the reason (a client outside tls-authz). The source waits for it, so
it learns of a refusal in words, and (TLS 1.3) receives the session ticket that lets the
extra channels resume the first channel's session instead of a full handshake each.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import ssl
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from vmferry.errors import ConfigError, MigrationError
from vmferry.migration.channel import MigrationUri
from vmferry.migration.codec import MAGIC
from vmferry.migration.streamcap import HEAD_LIMIT
from vmferry.migration.tlssocket import TlsSocket

log = logging.getLogger(__name__)

CA_CERT = "ca-cert.pem"
SERVER_CERT = "server-cert.pem"
SERVER_KEY = "server-key.pem"
CLIENT_CERT = "client-cert.pem"
CLIENT_KEY = "client-key.pem"
HANDSHAKE_TIMEOUT_S = 10.0
MAX_VERDICT = 4096
TLS_RECORD_HANDSHAKE = 0x16  # the first byte of a ClientHello record
PLAIN_DRAIN_S = 2.0  # how long a refused plain source may take to read why and hang up

# OpenSSL's X509_V_ERR_* codes for the causes a user can act on.
_EXPIRED = 10
_NOT_YET_VALID = 9
_UNKNOWN_ISSUER = (2, 18, 19, 20, 21)
_HOSTNAME_MISMATCH = (62, 64)


def parse_authz(text: str) -> tuple[str, ...]:
    """``tls-authz``: client common names, comma-separated; "" admits any the CA signed."""
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    return names


def check_key_file(path: Path) -> None:
    """A private key others can read is a leaked key: refuse it, naming the file."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise ConfigError(f"TLS credentials: {path} does not exist") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"TLS credentials: the private key {path} is readable by others (mode "
            f"{stat.S_IMODE(mode):04o}); run chmod 600 {path}"
        )


def _creds_file(directory: Path, name: str) -> Path:
    path = directory / name
    if not path.is_file():
        raise ConfigError(f"TLS credentials: {path} is missing (tls-creds is {directory})")
    return path


def check_signed(ca: Path, cert: Path) -> None:
    """Refuse a certificate that no certificate in ``ca`` (a CA or a bundle) signed: a
    host's pair copied next to another CA's certificate fails every handshake later.
    Intermediates that follow the certificate in its file count as issuers too."""
    try:
        issuers = x509.load_pem_x509_certificates(ca.read_bytes())
        chain = x509.load_pem_x509_certificates(cert.read_bytes())
    except (ValueError, OSError) as e:
        raise ConfigError(f"TLS credentials: {cert} or {ca} does not load: {e}") from e
    for issuer in [*issuers, *chain[1:]]:
        try:
            chain[0].verify_directly_issued_by(issuer)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return
    raise ConfigError(
        f"TLS credentials: {cert} is not signed by the CA in {ca} (a certificate from "
        "another CA, or a CA certificate from another lab?)"
    )


def _context(directory: str, server: bool) -> ssl.SSLContext:
    d = Path(directory)
    if not d.is_dir():
        raise ConfigError(f"TLS credentials: {d} is not a directory")
    cert_name, key_name = (SERVER_CERT, SERVER_KEY) if server else (CLIENT_CERT, CLIENT_KEY)
    ca, cert, key = (_creds_file(d, n) for n in (CA_CERT, cert_name, key_name))
    check_key_file(key)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED  # the client's too: mutual authentication
    try:
        ctx.load_verify_locations(cafile=str(ca))
    except (ssl.SSLError, OSError) as e:
        raise ConfigError(f"TLS credentials: {ca} is not a usable CA certificate: {e}") from e
    try:
        ctx.load_cert_chain(str(cert), str(key))
    except (ssl.SSLError, OSError) as e:
        raise ConfigError(
            f"TLS credentials: {cert} and {key} are not a usable certificate and key: {e}"
        ) from e
    check_signed(ca, cert)
    return ctx


def check_creds(directory: str, *, server: bool) -> None:
    """Refuse a credentials directory the role cannot use (missing or unreadable files,
    a key others can read, a certificate that does not load), as a migration would."""
    _context(directory, server)


def peer_common_name(cert: dict[str, Any]) -> str:
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return ""


def _verify_cause(e: ssl.SSLCertVerificationError, whose: str) -> str:
    code = e.verify_code
    if code == _EXPIRED:
        return f"{whose} certificate has expired"
    if code == _NOT_YET_VALID:
        return f"{whose} certificate is not valid yet"
    if code in _UNKNOWN_ISSUER:
        return f"{whose} certificate is not signed by this host's CA ({CA_CERT})"
    if code in _HOSTNAME_MISMATCH:
        return f"{whose} certificate does not name the host: {e.verify_message}"
    return f"{whose} certificate was not accepted: {e.verify_message}"


def _alert_cause(e: ssl.SSLError, peer: str) -> str:
    """What an alert from the peer says about this host's certificate."""
    reason = (e.reason or "").upper()
    if "UNKNOWN_CA" in reason:
        return f"{peer} does not trust this host's certificate (not signed by its CA)"
    if "CERTIFICATE_EXPIRED" in reason:
        return f"{peer} refused this host's certificate: it has expired"
    if "CERTIFICATE_REQUIRED" in reason:
        return f"{peer} requires a client certificate"
    if "BAD_CERTIFICATE" in reason or "CERTIFICATE" in reason:
        return f"{peer} refused this host's certificate ({e.reason})"
    return ""


def _cause(e: BaseException, whose: str, peer: str) -> str:
    if isinstance(e, ssl.SSLCertVerificationError):
        return _verify_cause(e, whose)
    if isinstance(e, ssl.SSLError):
        reason = (e.reason or "").upper()
        if "WRONG_VERSION_NUMBER" in reason or "RECORD_LAYER" in reason:
            return f"{peer} does not speak TLS (was it started without tls-creds?)"
        return _alert_cause(e, peer) or f"TLS error: {e.reason or e}"
    if isinstance(e, TimeoutError):
        return f"no TLS handshake from {peer} within {HANDSHAKE_TIMEOUT_S:.0f} s"
    if isinstance(e, EOFError):
        return f"{peer} closed the connection during the TLS handshake"
    if isinstance(e, OSError):
        return f"connection to {peer} lost during the TLS handshake: {e.strerror or e}"
    return str(e)


@dataclass
class Handshake:
    """How one connection's handshake went (the bench and the log report it): ``seconds``
    from the handshake's start to the destination's verdict (an extra channel's includes
    the wait for the destination to accept it)."""

    index: int
    seconds: float
    resumed: bool


class TlsClient:
    """The source's side: one context and session for all channels of a migration."""

    def __init__(self, creds: str, hostname: str) -> None:
        self.context = _context(creds, server=False)
        self.hostname = hostname
        self.session: ssl.SSLSession | None = None
        self.handshakes: list[Handshake] = []

    def secure(self, sock: socket.socket, index: int) -> TlsSocket:
        """Handshake on a connected socket and wait for the destination's verdict.
        Channel 0's session is the one the others resume."""
        tls = TlsSocket.wrap(sock)
        self._establish(tls, index)
        return tls

    def secure_later(self, sock: socket.socket, index: int) -> TlsSocket:
        """The same on a thread: the destination takes an extra channel only after the
        main stream's set-up, which the source writes after opening every channel. What
        is written before the handshake ends (the channel's first section) waits."""
        tls = TlsSocket.wrap(sock)
        tls.defer_writes()

        def run() -> None:
            try:
                self._establish(tls, index)
            except BaseException as e:
                tls.mark_ready(e)
            else:
                tls.mark_ready()

        threading.Thread(target=run, name=f"tls-channel-{index}", daemon=True).start()
        return tls

    def _establish(self, tls: TlsSocket, index: int) -> None:
        t0 = time.monotonic()
        try:
            tls.settimeout(HANDSHAKE_TIMEOUT_S)
            tls.handshake(
                self.context, server_side=False, hostname=self.hostname, session=self.session
            )
            verdict = tls.read_line(MAX_VERDICT)
            tls.settimeout(None)
        except (OSError, EOFError, ssl.SSLError) as e:
            tls.close()
            raise MigrationError(
                f"TLS with the destination failed: "
                f"{_cause(e, 'the destination', 'the destination')}"
            ) from e
        except BaseException:
            tls.close()
            raise
        try:
            msg = json.loads(verdict)
        except json.JSONDecodeError:
            msg = {}
        if not isinstance(msg, dict) or msg.get("kind") != "tls-ok":
            tls.close()
            error = msg.get("error", verdict[:200]) if isinstance(msg, dict) else verdict[:200]
            raise MigrationError(f"the destination refused: {error}")
        hs = Handshake(index, time.monotonic() - t0, tls.session_reused)
        self.handshakes.append(hs)
        log.info(
            "TLS channel %d: %s handshake in %.1f ms",
            index,
            "resumed" if hs.resumed else "full",
            hs.seconds * 1e3,
        )
        if self.session is None:
            self.session = tls.session


class TlsServer:
    """The destination's side: refuses a plain stream, strangers and outsiders."""

    def __init__(self, creds: str, authz: tuple[str, ...] = ()) -> None:
        # One context for every connection: its ticket keys let a channel resume.
        self.context = _context(creds, server=True)
        self.authz = authz

    def secure(self, sock: socket.socket, what: str) -> TlsSocket:
        try:
            self._refuse_plain(sock)
        except BaseException:
            sock.close()
            raise
        tls = TlsSocket.wrap(sock)
        try:
            self._admit(tls, "source" if what == "source" else f"source ({what})")
        except BaseException:
            tls.close()
            raise
        return tls

    def _admit(self, tls: TlsSocket, who: str) -> None:
        try:
            tls.settimeout(HANDSHAKE_TIMEOUT_S)
            tls.handshake(self.context, server_side=True)
            tls.settimeout(None)
        except (OSError, EOFError, ssl.SSLError) as e:
            raise MigrationError(
                f"TLS with the {who} failed: {_cause(e, f'the {who}', f'the {who}')}"
            ) from e
        cert = tls.getpeercert()
        name = peer_common_name(cert or {})
        if self.authz and name not in self.authz:
            error = (
                f"the {who}'s certificate (CN={name!r}) is not in tls-authz "
                f"({', '.join(self.authz)})"
            )
            with contextlib.suppress(OSError):
                tls.sendall(json.dumps({"kind": "failed", "error": error}).encode() + b"\n")
            raise MigrationError(f"refused a migration: {error}")
        tls.sendall(json.dumps({"kind": "tls-ok"}).encode() + b"\n")
        log.info("TLS %s: CN=%s, session %s", who, name, "resumed" if tls.session_reused else "new")

    @staticmethod
    def _refuse_plain(sock: socket.socket) -> None:
        """A plain vmferry stream is answered in plain words (the source reads its reply
        path), having read nothing: only its first bytes, peeked."""
        sock.settimeout(HANDSHAKE_TIMEOUT_S)
        try:
            first = sock.recv(len(MAGIC), socket.MSG_PEEK)
        except TimeoutError:
            raise MigrationError(
                f"no TLS handshake from the source within {HANDSHAKE_TIMEOUT_S:.0f} s"
            ) from None
        finally:
            sock.settimeout(None)
        if not first or first[0] == TLS_RECORD_HANDSHAKE:
            return
        plain = MAGIC.startswith(first)
        error = (
            "this destination requires TLS (tls-creds), but the source sent a plain stream"
            if plain
            else f"this destination requires TLS, but the source sent {first!r}"
        )
        if plain:
            with contextlib.suppress(OSError):
                sock.sendall(json.dumps({"kind": "failed", "error": error}).encode() + b"\n")
                sock.shutdown(socket.SHUT_WR)
                _discard_until_closed(sock)
        raise MigrationError(f"refused a migration: {error}")


def _discard_until_closed(sock: socket.socket) -> None:
    """Closing with the source's set-up unread would reset the connection, and a reset
    can reach the source before the refusal it should read: take in (and drop) what a
    set-up holds, briefly, until the source hangs up."""
    deadline = time.monotonic() + PLAIN_DRAIN_S
    left = HEAD_LIMIT
    while left > 0 and (wait := deadline - time.monotonic()) > 0:
        sock.settimeout(wait)
        try:
            n = len(sock.recv(min(left, 1 << 16)))
        except OSError:
            return
        if n == 0:
            return
        left -= n


def client_for(creds: str, hostname: str, uri: MigrationUri) -> TlsClient | None:
    """The source's TLS for a migration to ``uri`` (None without tls-creds)."""
    if not creds:
        return None
    if uri.scheme != "tcp":
        raise ConfigError(f"tls-creds applies to tcp: migrations, not to {uri}")
    return TlsClient(creds, hostname or uri.host)


def server_for(creds: str, authz: str) -> TlsServer | None:
    """The destination's TLS (None without tls-creds)."""
    if not creds:
        if authz:
            raise ConfigError("tls-authz needs tls-creds: only a TLS client has an identity")
        return None
    return TlsServer(creds, parse_authz(authz))


__all__ = [
    "CA_CERT",
    "CLIENT_CERT",
    "CLIENT_KEY",
    "SERVER_CERT",
    "SERVER_KEY",
    "Handshake",
    "TlsClient",
    "TlsServer",
    "check_creds",
    "check_key_file",
    "check_signed",
    "client_for",
    "parse_authz",
    "server_for",
]
