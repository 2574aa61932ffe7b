"""Who may call what: the bearer tokens each kind of endpoint requires, and the TLS material
every listener shares. Protocol-neutral: the gRPC interceptor (hub/protocol/auth.py) and the
REST middleware (hub/protocol/rest/auth.py) decide which kind an endpoint is and ask here."""

from __future__ import annotations

import enum
import hmac
import ssl
from dataclasses import dataclass
from pathlib import Path

from hub.errors import Unauthenticated


class Access(enum.Enum):
    """What an endpoint is, for the purpose of asking for a token."""

    OPEN = "open"  # health: probes never carry a token
    INFERENCE = "inference"  # inference, metadata, statistics, the index
    CONTROL = "control"  # load and unload, shared-memory registration, the log and trace settings


@dataclass(frozen=True)
class Tokens:
    """The bearer tokens a server requires; None requires none. Model control takes its own
    token when it has one, else the inference token."""

    inference: str | None = None
    control: str | None = None

    def __post_init__(self) -> None:
        for flag, token in (("--auth-token", self.inference), ("--model-control-token", self.control)):
            if token is not None and (not token or not token.isascii() or not token.isprintable() or " " in token):
                raise ValueError(f"{flag} must be non-empty printable ASCII without spaces")

    @property
    def required(self) -> bool:
        return self.inference is not None or self.control is not None

    def _expected(self, access: Access) -> tuple[str, str] | None:
        if access is Access.CONTROL and self.control is not None:
            return self.control, "--model-control-token"
        if access is not Access.OPEN and self.inference is not None:
            return self.inference, "--auth-token"
        return None

    def check(self, access: Access, authorization: str | None) -> None:
        """Raise Unauthenticated unless `authorization` (the header's or metadata's value,
        "Bearer <token>") carries the token `access` requires. The message names the flag
        whose token is wanted and never echoes what was sent."""
        expected = self._expected(access)
        if expected is None:
            return
        token, flag = expected
        if authorization is None:
            raise Unauthenticated(
                f"this endpoint requires a bearer token ({flag}): send 'authorization: Bearer <token>'"
            )
        scheme, _, presented = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            raise Unauthenticated(f"the authorization must read 'Bearer <token>' (the token of {flag})")
        if not hmac.compare_digest(presented.strip().encode(), token.encode()):
            raise Unauthenticated(f"the bearer token is not the one this endpoint requires ({flag})")


@dataclass(frozen=True)
class TlsConfig:
    """A PEM certificate chain and key for every listener; with `client_ca`, clients must
    present a certificate that it signed (mutual TLS)."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    def read(self) -> tuple[bytes, bytes, bytes | None]:
        """The certificate, key and client CA as bytes (what grpc takes); an unreadable file
        is an error naming its flag."""
        return (
            _read(self.cert, "--tls-cert"),
            _read(self.key, "--tls-key"),
            None if self.client_ca is None else _read(self.client_ca, "--tls-client-ca"),
        )

    def server_context(self) -> ssl.SSLContext:
        """An SSLContext for the HTTP listeners."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        self.read()  # the same errors as gRPC's, naming the flag, before ssl's terser ones
        try:
            context.load_cert_chain(self.cert, self.key)
            if self.client_ca is not None:
                context.load_verify_locations(cafile=self.client_ca)
                context.verify_mode = ssl.CERT_REQUIRED
        except ssl.SSLError as exc:
            raise ValueError(f"--tls-cert/--tls-key/--tls-client-ca are not a usable PEM set: {exc}") from None
        return context


def _read(path: Path, flag: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read {flag} {path}: {exc.strerror}") from None
