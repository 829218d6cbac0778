"""Mutual TLS between the roles: certificates, credentials, channels, and who may call what.

Every role holds a certificate from the mesh CA. Its role is written into the certificate twice:
- a URI SAN `spiffe://kvmesh/role/<role>`, which a server reads from the caller's certificate to decide
  whether that caller may call the method (ALLOWED_CALLERS; anything not listed is refused);
- a DNS SAN `<role>.kvmesh.internal`, which a caller checks on the server's certificate (the channel's
  target name), so a gateway talks only to a real decode worker, whatever pod IP it dials.

grpcio does the TLS (grpc.ssl_server_credentials with require_client_auth, grpc.ssl_channel_credentials);
`cryptography` only makes certificates for development (make_ca, issue, make_mesh_certs).
"""

from __future__ import annotations

import datetime
import inspect
import ipaddress
import os
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

MESH_ROLES = ("gateway", "prefill", "decode", "cache-store")
ROLE_URI_PREFIX = "spiffe://kvmesh/role/"
ROLE_DNS_SUFFIX = ".kvmesh.internal"
CA_CERT_FILE = "ca.crt"
CA_KEY_FILE = "ca.key"

_HEALTH = "/grpc.health.v1.Health/"
_REFLECTION = ("/grpc.reflection.v1alpha.ServerReflection/", "/grpc.reflection.v1.ServerReflection/")
ALLOWED_CALLERS: Mapping[str, frozenset[str]] = {
    "/kvmesh.v1.Decode/Generate": frozenset({"gateway"}),
    "/kvmesh.v1.Prefill/Prefill": frozenset({"decode"}),
    "/kvmesh.v1.Prefill/CancelPrefill": frozenset({"decode"}),
    "/kvmesh.v1.CacheStore/Register": frozenset({"prefill", "decode"}),
    "/kvmesh.v1.CacheStore/Heartbeat": frozenset({"prefill", "decode"}),
    "/kvmesh.v1.CacheStore/PublishKVEvents": frozenset({"prefill", "decode"}),
    "/kvmesh.v1.CacheStore/Lookup": frozenset({"gateway"}),
    "/kvmesh.v1.CacheStore/ListWorkers": frozenset({"gateway"}),
}
"""Method -> the roles that may call it on a mesh (mutual TLS) port. Health and reflection are open to
every mesh role; any other method is refused."""


@dataclass(frozen=True)
class TLSConfig:
    """One role's mesh identity: PEM files of the mesh CA and of this role's certificate and key."""

    ca_file: str
    """The mesh CA certificate: peers' certificates must chain to it."""
    cert_file: str
    """This role's certificate (chain), presented as server and as client."""
    key_file: str
    """This role's private key."""

    @classmethod
    def in_dir(cls, directory: str | Path, role: str) -> TLSConfig:
        """The layout `kvmesh certs` writes and `--tls-dir` reads: ca.crt, <role>.crt, <role>.key."""
        path = Path(directory)
        return cls(str(path / CA_CERT_FILE), str(path / f"{role}.crt"), str(path / f"{role}.key"))

    def read(self) -> tuple[bytes, bytes, bytes]:
        """(CA, certificate, key) as PEM bytes; raises OSError naming a file that cannot be read."""
        return _read(self.ca_file), _read(self.cert_file), _read(self.key_file)


@dataclass(frozen=True)
class PublicTLSConfig:
    """Server-only TLS for a public port: clients check the server; they authenticate with API keys."""

    cert_file: str
    """The server's certificate (chain), PEM."""
    key_file: str
    """The server's private key, PEM."""


def _read(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise OSError(f"cannot read TLS file {path}: {error.strerror or error}") from None


# ---- credentials and channels ----------------------------------------------------------------------------


def server_credentials(tls: TLSConfig) -> grpc.ServerCredentials:
    """A mesh port: callers must present a certificate that chains to the mesh CA."""
    ca, cert, key = tls.read()
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=True)


def public_server_credentials(tls: PublicTLSConfig) -> grpc.ServerCredentials:
    """A public port: TLS without client certificates."""
    return grpc.ssl_server_credentials([(_read(tls.key_file), _read(tls.cert_file))])


def role_dns_name(role: str) -> str:
    """The DNS SAN that names a role in its certificate, and the name a caller verifies."""
    return f"{role}{ROLE_DNS_SUFFIX}"


def mesh_channel(
    address: str,
    tls: TLSConfig | None,
    server_role: str,
    options: Sequence[tuple[str, Any]] = (),
) -> grpc.aio.Channel:
    """A grpc.aio channel to a role at address: mutual TLS when tls is set, plaintext otherwise.

    With TLS, the server must present a certificate of server_role (its DNS SAN, checked instead of the
    dialled host: workers are dialled by pod IP, which no certificate can name ahead of time).
    """
    if tls is None:
        return grpc.aio.insecure_channel(address, options=list(options))
    ca, cert, key = tls.read()
    credentials = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
    options = [*options, ("grpc.ssl_target_name_override", role_dns_name(server_role))]
    return grpc.aio.secure_channel(address, credentials, options=options)


# ---- who may call what -----------------------------------------------------------------------------------


def caller_role(auth_context: Mapping[str, Sequence[bytes]]) -> str | None:
    """The role in the caller's certificate (its `spiffe://kvmesh/role/` URI SAN); None without one, or
    with more than one."""
    # grpcio lists URI SANs under peer_uri; x509_subject_alternative_name holds every SAN (older grpcio).
    names = auth_context.get("peer_uri") or auth_context.get("x509_subject_alternative_name", ())
    roles = {
        name.decode(errors="replace").removeprefix(ROLE_URI_PREFIX)
        for name in names
        if name.startswith(ROLE_URI_PREFIX.encode())
    }
    return roles.pop() if len(roles) == 1 else None


def may_call(role: str | None, method: str) -> bool:
    """Whether a caller of that role may call method ("/package.Service/Method") on a mesh port."""
    if role not in MESH_ROLES:
        return False
    if method.startswith((_HEALTH, *_REFLECTION)):
        return True
    return role in ALLOWED_CALLERS.get(method, frozenset())


def _refusal(role: str | None, method: str) -> str:
    allowed = sorted(ALLOWED_CALLERS.get(method, ()))
    who = f"only {', '.join(allowed)} may call it" if allowed else "no role may call it"
    caller = f"role {role!r}" if role is not None else "a caller whose certificate names no kvmesh role"
    return f"{caller} may not call {method}: {who}"


class RoleCheckInterceptor(grpc.aio.ServerInterceptor):
    """Refuses with PERMISSION_DENIED a call whose caller's role (from its client certificate) may not
    call the method (ALLOWED_CALLERS). Only on a mutual TLS port: the TLS handshake already refused
    callers without a certificate from the mesh CA."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        # NOTE: grpc.aio interceptors see no peer; the check runs first thing in the handler instead.
        method = handler_call_details.method
        kind = (
            ("stream" if handler.request_streaming else "unary")
            + "_"
            + ("stream" if handler.response_streaming else "unary")
        )
        behavior = getattr(handler, kind)
        make_handler = getattr(grpc, f"{kind}_rpc_method_handler")
        return make_handler(
            _checked(behavior, method),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


def _checked(behavior: Callable[..., Any], method: str) -> Callable[..., Any]:
    async def check(context: grpc.aio.ServicerContext) -> None:
        role = caller_role(context.auth_context())
        if not may_call(role, method):
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, _refusal(role, method))

    if inspect.isasyncgenfunction(behavior):

        async def checked_gen(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await check(context)
            async for response in behavior(request, context):
                yield response

        return checked_gen

    async def checked(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await check(context)
        return await behavior(request, context)

    return checked


# ---- development certificates ----------------------------------------------------------------------------

CA_VALIDITY = datetime.timedelta(days=365)
CERT_VALIDITY = datetime.timedelta(days=90)


def make_ca(directory: str | Path, name: str = "kvmesh development CA") -> Path:
    """Writes a new CA (ca.crt, and ca.key readable by the owner only) to directory; returns ca.crt."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + CA_VALIDITY)
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
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_key(path / CA_KEY_FILE, key)
    (path / CA_CERT_FILE).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path / CA_CERT_FILE


def issue(directory: str | Path, role: str, hosts: Sequence[str] = ()) -> TLSConfig:
    """Writes <role>.crt and <role>.key, signed by the CA in directory (make_ca), and returns the role's
    TLSConfig. The certificate names the role (URI and DNS SAN), localhost and 127.0.0.1/::1, and hosts
    (DNS names or IP addresses: a Kubernetes Service name, say). It serves as server and as client."""
    if role not in MESH_ROLES:
        raise ValueError(f"unknown role {role!r}: choose one of {', '.join(MESH_ROLES)}")
    path = Path(directory)
    ca_key = serialization.load_pem_private_key((path / CA_KEY_FILE).read_bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate((path / CA_CERT_FILE).read_bytes())
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{path / CA_KEY_FILE}: expected the EC key that make_ca writes")
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [
        x509.UniformResourceIdentifier(ROLE_URI_PREFIX + role),
        x509.DNSName(role_dns_name(role)),
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ]
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, role)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(min(now + CERT_VALIDITY, ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    _write_key(path / f"{role}.key", key)
    (path / f"{role}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return TLSConfig.in_dir(path, role)


def make_mesh_certs(directory: str | Path, hosts: Sequence[str] = ()) -> Path:
    """A new CA and a certificate for every role in directory (the layout --tls-dir reads); returns it."""
    make_ca(directory)
    for role in MESH_ROLES:
        issue(directory, role, hosts)
    return Path(directory)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    # Created owner-only from the start: never readable by others, not even for a moment.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as file:
        os.fchmod(file.fileno(), 0o600)  # an existing file keeps its mode on open
        file.write(pem)
