"""How the client commands (infer, models --url, health, top) reach a server: their TLS and
token flags, checked in one place, as a gRPC channel or an SSL context for HTTPS.

Checking here, before anything connects, turns what grpc would make of a bad flag (a certificate
without its key aborts the process in grpc's C core; an unreadable CA is a traceback; a CA that
is not one only logs noise and then UNAVAILABLE) into one line naming the flag.
"""

from __future__ import annotations

import argparse
import os
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import grpc

#: The client's TLS flags, as --tls-<name>: what each holds.
TLS_FLAGS = (
    ("ca", "PEM CA bundle that signed the server's certificate: speak TLS"),
    ("cert", "PEM client certificate, for a server with --tls-client-ca (with --tls-key)"),
    ("key", "PEM private key of --tls-cert"),
)


class FlagError(Exception):
    """A client flag, or the variable it came from, that cannot work as given; the message
    names it. `modelhub` prints it as one line and exits 2."""


def tls_variable(command: str, flag: str) -> str:
    """The variable a command's --tls-<flag> reads: MODELHUB_<COMMAND>_TLS_<FLAG>. Each command
    has its own: in a container MODELHUB_TLS_* are the server's certificate, not a client's."""
    return f"MODELHUB_{command.upper()}_TLS_{flag.upper()}"


def add_client_args(parser: argparse.ArgumentParser, command: str) -> None:
    """--tls-ca, --tls-cert, --tls-key and --token, for client command `command`."""
    for flag, what in TLS_FLAGS:
        env = tls_variable(command, flag)
        parser.add_argument(f"--tls-{flag}", type=Path, default=os.environ.get(env), help=f"{what} (env {env})")
    parser.add_argument(
        "--token",
        default=os.environ.get("MODELHUB_AUTH_TOKEN"),
        help="bearer token for a server started with --auth-token (env MODELHUB_AUTH_TOKEN, as the server's)",
    )


@dataclass(frozen=True)
class Connection:
    """What a client command sends a server: TLS material (none: plaintext) and a bearer token.
    Build it with `from_args`, which checks the flags."""

    token: str | None = None
    #: The CA, client key and client certificate, in grpc.ssl_channel_credentials's order; None without --tls-ca.
    pem: tuple[bytes, bytes | None, bytes | None] | None = field(default=None, repr=False)
    #: The same material for HTTPS (`modelhub top`).
    ssl_context: ssl.SSLContext | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Connection:
        """The command's --tls-* and --token. A client certificate needs its key (and the key
        its certificate) and --tls-ca; each file must hold what its flag names, and the key must
        be the certificate's. Raises FlagError naming the flag, and the variable where one is set."""
        ca, cert, key = args.tls_ca, args.tls_cert, args.tls_key
        name = {
            flag: _flag_name(args.command, flag, value) for flag, value in (("ca", ca), ("cert", cert), ("key", key))
        }
        if cert is not None and key is None:
            raise FlagError(f"{name['cert']} needs --tls-key (the private key of the client certificate)")
        if key is not None and cert is None:
            raise FlagError(f"{name['key']} needs --tls-cert (the client certificate whose key it is)")
        if ca is None and cert is not None:
            raise FlagError(f"{name['cert']} needs --tls-ca (the CA that signed the server's certificate)")
        if ca is None:
            return cls(token=args.token)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ca_pem = _read(ca, name["ca"])
        try:
            context.load_verify_locations(cafile=ca)
        except ssl.SSLError as exc:
            raise FlagError(f"{name['ca']} {ca} cannot be used as the CA: {_why(exc, 'certificate')}") from None
        cert_pem = key_pem = None
        if cert is not None and key is not None:
            cert_pem, key_pem = _read(cert, name["cert"]), _read(key, name["key"])
            if b"-----BEGIN CERTIFICATE-----" not in cert_pem:
                raise FlagError(f"{name['cert']} {cert} holds no PEM certificate")
            if b"PRIVATE KEY-----" not in key_pem:
                raise FlagError(f"{name['key']} {key} holds no PEM private key")
            try:  # never prompts: grpc cannot use a key that needs a passphrase either
                context.load_cert_chain(cert, key, password=lambda: b"")
            except ssl.SSLError as exc:
                if exc.reason == "KEY_VALUES_MISMATCH":
                    raise FlagError(f"{name['key']} {key} is not the private key of --tls-cert {cert}") from None
                raise FlagError(f"{name['cert']} {cert} and {name['key']} {key} cannot be used: {_why(exc)}") from None
        return cls(token=args.token, pem=(ca_pem, key_pem, cert_pem), ssl_context=context)

    @property
    def tls(self) -> bool:
        return self.pem is not None

    @property
    def metadata(self) -> tuple[tuple[str, str], ...] | None:
        """The token as gRPC metadata (None without one)."""
        return (("authorization", f"Bearer {self.token}"),) if self.token else None

    def grpc_credentials(self) -> grpc.ChannelCredentials | None:
        """TLS credentials for a gRPC channel; None for plaintext."""
        import grpc

        if self.pem is None:
            return None
        root, private_key, chain = self.pem
        return grpc.ssl_channel_credentials(root, private_key, chain)

    def channel(self, url: str) -> grpc.Channel:
        """A gRPC channel to `url`: over TLS with --tls-ca, else plaintext."""
        import grpc

        credentials = self.grpc_credentials()
        return grpc.insecure_channel(url) if credentials is None else grpc.secure_channel(url, credentials)


def _flag_name(command: str, flag: str, value: Any) -> str:
    """--tls-<flag>, and the variable too where it holds this value (it may be where it came from)."""
    env = tls_variable(command, flag)
    if value is not None and os.environ.get(env) == str(value):
        return f"--tls-{flag} (env {env})"
    return f"--tls-{flag}"


def _read(path: Path, name: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise FlagError(f"cannot read {name} {path}: {exc.strerror or exc}") from None


def _why(exc: ssl.SSLError, wanted: str = "") -> str:
    if exc.reason == "NO_CERTIFICATE_OR_CRL_FOUND" and wanted:
        return f"it holds no PEM {wanted}"
    return f"ssl says {exc.reason or exc}"
