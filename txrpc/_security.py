"""Security: TLS and mutual TLS, authentication in the hello, authorization of methods.

* **TLS** — :class:`TLSConfig` names the files (trust anchors, own certificate and key)
  and builds ``ssl.SSLContext`` objects for either side. Verification is on whenever TLS
  is: a client checks the server's certificate chain and name; a server that verifies
  client certificates (``client_cert="require"``, mutual TLS) refuses a connection
  without a valid one during the TLS handshake.
* **Authentication** — a connection's :class:`Principal` comes from the client
  certificate (its subject's common name) or from a bearer token in the hello
  (``auth = {"bearer": TOKEN}``), checked by a pluggable :class:`TokenVerifier`.
  :class:`HmacTokenVerifier` is the built-in one: HMAC-SHA256-signed tokens with an
  expiry (:func:`mint_token`). No valid credential (and anonymous callers not
  allowed) → the server answers the hello with a goaway ``UNAUTHENTICATED`` and closes.
* **Authorization** — a method may declare the roles allowed to call it
  (``@service.method(allow=ROLE_ADMIN)``, ``Service("tx", allow=ROLE_PEER)``); a
  server may override per method (``ServerSecurity(rules=...)``). A caller with none
  of the roles gets ``PERMISSION_DENIED`` and nothing runs. Roles come from
  ``ServerSecurity(roles={identity: roles})`` and from signed token claims.
* **Credentials of a client** — :class:`Credentials` (TLS settings and/or a token) go
  to ``txrpc.connect(..., credentials=...)``; a node's processes set them once with
  :func:`use_credentials`, and every client the node's tasks open uses them (like the
  node's ``txrpc._env`` environment, they are task-inherited context).

The threat model and what each mechanism stops: ``specs/security.md``.
"""

from __future__ import annotations

import base64
import contextlib
import contextvars
import dataclasses
import hashlib
import hmac
import inspect
import json
import math
import os
import ssl
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal, Protocol

from . import _env
from ._errors import Unauthenticated

ROLE_PEER = frozenset({"peer"})
"""Cluster members: the coordinator and shard nodes (participant, replication, shard-map
messages)."""
ROLE_ADMIN = frozenset({"admin"})
"""Operators (heuristic resolution, listing transactions)."""
ROLE_PEER_OR_ADMIN = ROLE_PEER | ROLE_ADMIN

ANONYMOUS = "anonymous"
TOKEN_PREFIX = "txrpc1"
TOKEN_BYTES_MAX = 4096
"""Longest bearer token accepted (a longer one is refused unread)."""
TOKEN_ROLES_MAX = 32
NAME_CHARS_MAX = 255
SECRET_BYTES_MIN = 16
TOKEN_LEEWAY_S_DEFAULT = 30.0
"""Clock skew tolerated when checking a token's expiry."""

ClientCertMode = Literal["require", "optional", "none"]


@dataclasses.dataclass(frozen=True, slots=True)
class Principal:
    """Who is on the other end of a connection, as the server established it.

    ``name`` scopes idempotency keys (``CallContext.identity``); ``roles`` decide which
    methods it may call; ``via`` says how it was authenticated: ``"certificate"``,
    ``"token"`` or ``"anonymous"``.
    """

    name: str
    roles: frozenset[str] = frozenset()
    via: str = "anonymous"


ANONYMOUS_PRINCIPAL = Principal(ANONYMOUS)


def _check_name(name: Any, what: str) -> str:
    if type(name) is not str or not 0 < len(name) <= NAME_CHARS_MAX or not name.isprintable():
        raise Unauthenticated(f"{what} must be a printable name of 1..{NAME_CHARS_MAX} characters")
    return name


# --- tokens ---------------------------------------------------------------------------


class TokenVerifier(Protocol):
    """Checks a bearer token and says whose it is.

    ``verify`` returns the :class:`Principal` (it may be a coroutine function, e.g. to ask
    an identity service) or raises :class:`~txrpc.Unauthenticated` saying why the token is
    not good. It runs within the connection's ``handshake_timeout_s``.
    """

    def verify(self, token: str) -> Principal | Awaitable[Principal]: ...


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    if not text or not all(c.isalnum() or c in "-_" for c in text):
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _sign(secret: bytes, signed_part: str) -> bytes:
    return hmac.new(secret, signed_part.encode("ascii"), hashlib.sha256).digest()


def mint_token(
    secret: bytes,
    subject: str,
    *,
    roles: Iterable[str] = (),
    ttl_s: float = 3600.0,
    now: float | None = None,
) -> str:
    """A bearer token for ``subject`` with ``roles``, valid for ``ttl_s`` from ``now``
    (default: the wall clock), signed with ``secret`` (HMAC-SHA256).

    Format: ``txrpc1.<base64url(JSON claims)>.<base64url(signature)>``; the claims are
    ``sub``, ``roles``, ``iat`` and ``exp`` (seconds since the epoch). Anyone holding
    ``secret`` can mint tokens with any roles: keep it with the operators and nodes.
    """
    if len(secret) < SECRET_BYTES_MIN:
        raise ValueError(f"the token secret must be at least {SECRET_BYTES_MIN} bytes")
    _check_name(subject, "token subject")
    if not ttl_s > 0 or not math.isfinite(ttl_s):
        raise ValueError("ttl_s must be a positive number of seconds")
    issued = _env.wall_time() if now is None else now
    claims = {"sub": subject, "roles": sorted(set(roles)), "iat": int(issued), "exp": int(issued + ttl_s)}
    payload = _b64(json.dumps(claims, sort_keys=True, separators=(",", ":")).encode())
    signed_part = f"{TOKEN_PREFIX}.{payload}"
    return f"{signed_part}.{_b64(_sign(secret, signed_part))}"


class HmacTokenVerifier:
    """The built-in :class:`TokenVerifier`: tokens made by :func:`mint_token`.

    ``secrets`` are the accepted keys, current first (keep the previous one here while
    rotating). A token is refused when it is malformed, longer than
    ``TOKEN_BYTES_MAX``, signed with no accepted key, or expired (``exp`` earlier than
    ``wall_clock() - leeway_s``). ``wall_clock`` is injected (default: the node's wall
    clock, ``time.time`` in production).
    """

    def __init__(
        self,
        *secrets: bytes,
        wall_clock: Callable[[], float] = _env.wall_time,
        leeway_s: float = TOKEN_LEEWAY_S_DEFAULT,
    ) -> None:
        if not secrets:
            raise ValueError("HmacTokenVerifier needs at least one secret")
        for secret in secrets:
            if len(secret) < SECRET_BYTES_MIN:
                raise ValueError(f"a token secret must be at least {SECRET_BYTES_MIN} bytes")
        self._secrets = tuple(secrets)
        self._wall_clock = wall_clock
        self.leeway_s = leeway_s

    def verify(self, token: str) -> Principal:
        if type(token) is not str or len(token) > TOKEN_BYTES_MAX:
            raise Unauthenticated(f"bearer token must be a string of at most {TOKEN_BYTES_MAX} characters")
        parts = token.split(".")
        if len(parts) != 3 or parts[0] != TOKEN_PREFIX:
            raise Unauthenticated(f"malformed bearer token (expected {TOKEN_PREFIX}.<claims>.<signature>)")
        signed_part = f"{parts[0]}.{parts[1]}"
        try:
            signature = _unb64(parts[2])
            payload = _unb64(parts[1])
        except ValueError:
            raise Unauthenticated("malformed bearer token (bad base64url)") from None
        # Compare against every accepted key, in constant time per key.
        if not any(hmac.compare_digest(_sign(secret, signed_part), signature) for secret in self._secrets):
            raise Unauthenticated("bearer token signature is not valid (forged, or signed with another key)")
        try:
            claims = json.loads(payload)
        except (ValueError, UnicodeDecodeError):
            raise Unauthenticated("malformed bearer token claims") from None
        if type(claims) is not dict:
            raise Unauthenticated("malformed bearer token claims")
        subject = _check_name(claims.get("sub"), "token subject")
        expires = claims.get("exp")
        if not isinstance(expires, (int, float)) or isinstance(expires, bool) or not math.isfinite(expires):
            raise Unauthenticated("bearer token has no expiry")
        now = self._wall_clock()
        if expires < now - self.leeway_s:
            raise Unauthenticated(f"bearer token expired {now - expires:.0f} s ago")
        roles = claims.get("roles", [])
        if (
            type(roles) is not list
            or len(roles) > TOKEN_ROLES_MAX
            or not all(type(r) is str and 0 < len(r) <= NAME_CHARS_MAX for r in roles)
        ):
            raise Unauthenticated("bearer token roles must be a list of names")
        return Principal(subject, frozenset(roles), "token")


def load_secret(path: str | os.PathLike[str]) -> bytes:
    """A token secret from a file: hex text (as ``txrpc certs dev`` writes it) or raw bytes."""
    raw = Path(path).read_bytes()
    text = raw.strip()
    try:
        secret = bytes.fromhex(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        secret = raw
    if len(secret) < SECRET_BYTES_MIN:
        raise ValueError(f"{path}: a token secret must be at least {SECRET_BYTES_MIN} bytes")
    return secret


# --- TLS ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class TLSConfig:
    """Files for one side of TLS.

    ``ca_file``: trust anchors (PEM) for verifying the peer — a client needs it (or the
    system store is used when None); a server needs it to verify client certificates.
    ``cert_file`` / ``key_file``: this side's certificate chain and key — a server must
    have them; a client presents them for mutual TLS. ``client_cert`` (server side):
    ``"require"`` (mutual TLS: no valid client certificate, no connection),
    ``"optional"`` (verified if sent; callers without one authenticate with a token) or
    ``"none"``. ``server_name`` (client side): the name to verify in the server's
    certificate instead of the host dialled.
    """

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    client_cert: ClientCertMode = "require"
    server_name: str | None = None

    def __post_init__(self) -> None:
        if self.client_cert not in ("require", "optional", "none"):
            raise ValueError(f"client_cert must be require, optional or none, not {self.client_cert!r}")
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")

    def server_context(self) -> ssl.SSLContext:
        """A server-side context: TLS 1.2+, this side's certificate, client
        certificates verified against ``ca_file`` as ``client_cert`` says."""
        if self.cert_file is None or self.key_file is None:
            raise ValueError("a TLS server needs cert_file and key_file")
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.cert_file, self.key_file)
        if self.client_cert != "none":
            if self.ca_file is None:
                raise ValueError("verifying client certificates needs ca_file")
            context.load_verify_locations(cafile=self.ca_file)
            context.verify_mode = ssl.CERT_REQUIRED if self.client_cert == "require" else ssl.CERT_OPTIONAL
        else:
            context.verify_mode = ssl.CERT_NONE
        return context

    def client_context(self) -> ssl.SSLContext:
        """A client-side context: TLS 1.2+, the server's chain and name always verified."""
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.ca_file)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        assert context.verify_mode is ssl.CERT_REQUIRED and context.check_hostname
        if self.cert_file is not None and self.key_file is not None:
            context.load_cert_chain(self.cert_file, self.key_file)
        return context


def principal_from_certificate(cert: Mapping[str, Any] | None, roles: Mapping[str, frozenset[str]]) -> Principal | None:
    """The principal a verified peer certificate names (its subject's common name), or
    None if there is no certificate. Roles come from ``roles`` only (never from the
    certificate's own fields, which any CA the server trusts could set)."""
    if not cert:
        return None
    common_names = [value for rdn in cert.get("subject", ()) for key, value in rdn if key == "commonName"]
    if len(common_names) != 1:
        raise Unauthenticated("client certificate must name exactly one commonName")
    name = _check_name(common_names[0], "certificate commonName")
    return Principal(name, roles.get(name, frozenset()), "certificate")


# --- the server's policy --------------------------------------------------------------


RoleRule = frozenset[str]


class ServerSecurity:
    """How a :class:`~txrpc.Server` authenticates and authorizes.

    ``tls``: a :class:`TLSConfig` or a ready ``ssl.SSLContext`` (server side); every
    accepted stream is wrapped in ``trio.SSLStream``, and the TLS handshake counts
    against ``handshake_timeout_s``. ``token_verifier``: accepts bearer tokens from
    the hello. ``roles``: identity → roles it holds (certificate identities get roles
    only from here; a token's roles are its signed claims plus these).
    ``allow_anonymous``: callers with neither certificate nor token are served as
    ``"anonymous"`` with no roles (a presented but invalid credential is still refused).
    ``rules``: method name → roles allowed, overriding what the method declares.
    """

    def __init__(
        self,
        *,
        tls: TLSConfig | ssl.SSLContext | None = None,
        token_verifier: TokenVerifier | None = None,
        roles: Mapping[str, Iterable[str]] | None = None,
        allow_anonymous: bool = False,
        rules: Mapping[str, Iterable[str]] | None = None,
    ) -> None:
        self.client_cert_required = False
        if isinstance(tls, TLSConfig):
            self.ssl_context: ssl.SSLContext | None = tls.server_context()
            if tls.client_cert == "require":
                # OpenSSL still verifies any certificate presented (a bad one fails the
                # handshake); a missing one is refused in the hello, where the client
                # can be told why (UNAUTHENTICATED) instead of seeing a reset.
                self.ssl_context.verify_mode = ssl.CERT_OPTIONAL
                self.client_cert_required = True
        else:
            self.ssl_context = tls
        self.token_verifier = token_verifier
        self.roles: dict[str, frozenset[str]] = {name: frozenset(r) for name, r in (roles or {}).items()}
        self.allow_anonymous = allow_anonymous
        self.rules: dict[str, RoleRule] = {name: frozenset(r) for name, r in (rules or {}).items()}
        if self.ssl_context is None and token_verifier is None and not allow_anonymous:
            raise ValueError(
                "ServerSecurity with neither TLS nor a token verifier can authenticate nobody "
                "(pass tls=..., token_verifier=... or allow_anonymous=True)"
            )

    async def authenticate(self, peer_cert: Mapping[str, Any] | None, auth: Any) -> Principal:
        """The caller's principal from its verified certificate and the hello's ``auth``.

        A bearer token, when given, names the principal (the certificate authenticated
        the channel); otherwise the certificate does. Raises
        :class:`~txrpc.Unauthenticated` for a bad token, a malformed ``auth``, or no
        credential when anonymous callers are not allowed.
        """
        from_cert = principal_from_certificate(peer_cert, self.roles)
        if from_cert is None and self.client_cert_required:
            raise Unauthenticated("this server requires a client certificate (mutual TLS)")
        if auth is not None:
            if type(auth) is not dict or set(auth) != {"bearer"}:
                raise Unauthenticated('hello auth must be a map {"bearer": TOKEN}')
            if self.token_verifier is None:
                raise Unauthenticated("this server does not accept bearer tokens")
            token = auth["bearer"]
            if type(token) is not str:
                raise Unauthenticated("bearer token must be a text string")
            verified = self.token_verifier.verify(token)
            principal = await verified if inspect.isawaitable(verified) else verified
            if not isinstance(principal, Principal):
                raise TypeError(f"token verifier returned {type(principal).__name__}, not a Principal")
            extra = self.roles.get(principal.name, frozenset())
            return dataclasses.replace(principal, roles=principal.roles | extra) if extra else principal
        if from_cert is not None:
            return from_cert
        if self.allow_anonymous:
            return Principal(ANONYMOUS, self.roles.get(ANONYMOUS, frozenset()), "anonymous")
        raise Unauthenticated("no credentials: present a client certificate or a bearer token (hello auth)")

    def rule_for(self, method: str, declared: RoleRule | None) -> RoleRule | None:
        """The roles allowed to call ``method`` (None: any authenticated caller)."""
        return self.rules.get(method, declared)


# --- a client's credentials -----------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Credentials:
    """What a client presents: TLS settings (``TLSConfig`` or a client-side
    ``ssl.SSLContext``; the server is always verified) and/or a bearer ``token`` (a
    string, or a function returning a fresh one, called at every (re)connect)."""

    tls: TLSConfig | ssl.SSLContext | None = None
    token: str | Callable[[], str] | None = None
    server_name: str | None = None

    def ssl_context(self) -> ssl.SSLContext | None:
        if isinstance(self.tls, TLSConfig):
            return self.tls.client_context()
        return self.tls

    def tls_server_name(self, host: str) -> str:
        if self.server_name:
            return self.server_name
        if isinstance(self.tls, TLSConfig) and self.tls.server_name:
            return self.tls.server_name
        return host

    def hello_auth(self) -> dict[str, str] | None:
        if self.token is None:
            return None
        token = self.token() if callable(self.token) else self.token
        return {"bearer": token}


_current_credentials: contextvars.ContextVar[Credentials | None] = contextvars.ContextVar(
    "txrpc_credentials", default=None
)


def current_credentials() -> Credentials | None:
    """The credentials :func:`use_credentials` set for this task (None: plain TCP, no token)."""
    return _current_credentials.get()


@contextlib.contextmanager
def use_credentials(credentials: Credentials | None) -> Iterator[None]:
    """Clients opened (``txrpc.connect`` without ``credentials=``) in this block, and in
    tasks started from it, present ``credentials``. A node process sets its own once:
    its coordinator/participant/cluster clients then all speak TLS with its certificate."""
    token = _current_credentials.set(credentials)
    try:
        yield
    finally:
        _current_credentials.reset(token)


def is_certificate_failure(exc: BaseException) -> str | None:
    """A short reason if ``exc`` (or its cause) is a TLS certificate/handshake
    rejection, else None."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ssl.SSLCertVerificationError):
            return f"certificate verification failed: {current.verify_message or current.reason}"
        if isinstance(current, ssl.SSLError):
            reason = current.reason or str(current)
            upper = reason.upper()
            if "CERTIFICATE" in upper or "UNKNOWN_CA" in upper or "HANDSHAKE" in upper or "ACCESS_DENIED" in upper:
                return f"TLS handshake refused: {reason}"
        current = current.__cause__ or current.__context__
    return None


# --- a cluster's security (the [security] table of cluster.toml) ----------------------


@dataclasses.dataclass(frozen=True, slots=True)
class ClusterSecurity:
    """The ``[security]`` table of ``cluster.toml``: TLS on every listener and client of
    the cluster, mutual TLS by default, optional HMAC bearer tokens, and who is a peer
    or an admin.

    Certificates follow one layout (what ``txrpc certs dev`` writes): ``ca_file`` is the
    trust anchor; ``certs_dir/<name>.pem`` and ``certs_dir/<name>.key`` are the
    certificate and key of ``<name>`` — each node (by its node name), ``coordinator``,
    and each client or admin identity.
    """

    ca_file: Path
    certs_dir: Path
    client_cert: ClientCertMode = "require"
    token_secret_file: Path | None = None
    peers: tuple[str, ...] = ()
    """Identities with the ``peer`` role (default: ``coordinator`` and every node)."""
    admins: tuple[str, ...] = ("admin",)
    """Identities with the ``admin`` role (``txrpc tx`` commands present the first)."""
    client: str = "client"
    """The identity (certificate in ``certs_dir``) a cluster client presents by default."""
    token_ttl_s: float = 3600.0

    def roles(self) -> dict[str, frozenset[str]]:
        out: dict[str, set[str]] = {}
        for name in self.peers:
            out.setdefault(name, set()).add("peer")
        for name in self.admins:
            out.setdefault(name, set()).add("admin")
        return {name: frozenset(r) for name, r in out.items()}

    def tls_for(self, name: str | None) -> TLSConfig:
        cert = key = None
        if name is not None and self.client_cert != "none":
            cert, key = self.certs_dir / f"{name}.pem", self.certs_dir / f"{name}.key"
            if not cert.exists() or not key.exists():
                cert = key = None
        return TLSConfig(ca_file=self.ca_file, cert_file=cert, key_file=key, client_cert=self.client_cert)

    def server_security(self, name: str, *, rules: Mapping[str, Iterable[str]] | None = None) -> ServerSecurity:
        """What the node (or ``coordinator``) called ``name`` serves with."""
        tls = TLSConfig(
            ca_file=self.ca_file,
            cert_file=self.certs_dir / f"{name}.pem",
            key_file=self.certs_dir / f"{name}.key",
            client_cert=self.client_cert,
        )
        verifier = None
        if self.token_secret_file is not None:
            verifier = HmacTokenVerifier(load_secret(self.token_secret_file))
        return ServerSecurity(tls=tls, token_verifier=verifier, roles=self.roles(), rules=rules)

    def credentials_for(self, name: str | None = None) -> Credentials:
        """What ``name`` (default: :attr:`client`) presents as a client: its certificate
        when ``certs_dir`` has one, else (with ``token_secret_file``) a bearer token for
        ``name`` minted afresh at every connect, valid ``token_ttl_s``."""
        name = self.client if name is None else name
        tls = self.tls_for(name)
        token: Callable[[], str] | None = None
        if tls.cert_file is None and self.token_secret_file is not None:
            secret = load_secret(self.token_secret_file)
            ttl_s = self.token_ttl_s

            def token() -> str:
                return mint_token(secret, name, ttl_s=ttl_s)

        return Credentials(tls=tls, token=token)
