"""TLS, mutual TLS, bearer tokens and method authorization, over real TCP on loopback."""

from __future__ import annotations

import datetime
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio

import storage
import txrpc
from txrpc import _certs
from txrpc._security import HmacTokenVerifier, Principal, mint_token

NAMES = ("server", "client", "admin", "a", "coordinator")
SECRET = bytes(range(32))


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> _certs.DevCerts:
    return _certs.make_dev_certs(tmp_path_factory.mktemp("certs"), NAMES)


@pytest.fixture(scope="session")
def other_certs(tmp_path_factory: pytest.TempPathFactory) -> _certs.DevCerts:
    """Certificates from another CA (an attacker's, or another cluster's)."""
    return _certs.make_dev_certs(tmp_path_factory.mktemp("other"), ("client", "server"), ca_name="other CA")


def server_tls(certs: _certs.DevCerts, client_cert: str = "require") -> txrpc.TLSConfig:
    return txrpc.TLSConfig(
        ca_file=certs.ca_file,
        cert_file=certs.cert_file("server"),
        key_file=certs.key_file("server"),
        client_cert=client_cert,  # type: ignore[arg-type]
    )


def client_creds(certs: _certs.DevCerts, name: str | None = "client", **extra: Any) -> txrpc.Credentials:
    tls = txrpc.TLSConfig(
        ca_file=certs.ca_file,
        cert_file=None if name is None else certs.cert_file(name),
        key_file=None if name is None else certs.key_file(name),
    )
    return txrpc.Credentials(tls=tls, **extra)


def make_service() -> txrpc.Service:
    svc = txrpc.Service()

    @svc.method
    async def whoami() -> dict[str, Any]:
        ctx = txrpc.current_call()
        return {"identity": ctx.identity, "roles": sorted(ctx.roles)}

    @svc.method(allow=txrpc.ROLE_ADMIN)
    async def admin_only() -> str:
        return "done"

    @svc.method
    async def open_to_all() -> str:
        return "ok"

    return svc


@pytest.fixture
async def serve() -> AsyncIterator[Any]:
    async with trio.open_nursery() as nursery:
        servers: list[txrpc.Server] = []

        async def start(security: txrpc.ServerSecurity, **options: Any) -> txrpc.Server:
            server = txrpc.Server(make_service(), security=security, **options)
            await nursery.start(server.serve_tcp, "127.0.0.1", 0)
            servers.append(server)
            return server

        yield start
        for server in servers:
            await server.shutdown(grace_s=1)


async def whoami(port: int, **connect: Any) -> dict[str, Any]:
    async with txrpc.connect("127.0.0.1", port, **connect) as client:
        result: dict[str, Any] = await client.options(timeout=5).whoami()
        return result


async def assert_still_serving(port: int, certs: _certs.DevCerts) -> None:
    assert (await whoami(port, credentials=client_creds(certs)))["identity"] == "client"


# --- TLS and mutual TLS -------------------------------------------------------------------


async def test_mutual_tls_identity_from_certificate(serve: Any, certs: _certs.DevCerts) -> None:
    server = await serve(txrpc.ServerSecurity(tls=server_tls(certs), roles={"admin": {"admin"}}))
    assert await whoami(server.port, credentials=client_creds(certs)) == {"identity": "client", "roles": []}
    assert await whoami(server.port, credentials=client_creds(certs, "admin")) == {
        "identity": "admin",
        "roles": ["admin"],
    }


async def test_missing_client_certificate_is_rejected(serve: Any, certs: _certs.DevCerts) -> None:
    server = await serve(txrpc.ServerSecurity(tls=server_tls(certs)))
    with pytest.raises(txrpc.Unauthenticated) as info:
        await whoami(server.port, credentials=client_creds(certs, None))
    assert info.value.nothing_ran
    await assert_still_serving(server.port, certs)


async def test_certificate_from_another_ca_is_rejected(
    serve: Any, certs: _certs.DevCerts, other_certs: _certs.DevCerts
) -> None:
    server = await serve(txrpc.ServerSecurity(tls=server_tls(certs)))
    forged = txrpc.Credentials(
        tls=txrpc.TLSConfig(
            ca_file=certs.ca_file, cert_file=other_certs.cert_file("client"), key_file=other_certs.key_file("client")
        )
    )
    with pytest.raises(txrpc.Unauthenticated):
        await whoami(server.port, credentials=forged)
    await assert_still_serving(server.port, certs)


async def test_expired_client_certificate_is_rejected(serve: Any, certs: _certs.DevCerts, tmp_path: Path) -> None:
    server = await serve(txrpc.ServerSecurity(tls=server_tls(certs)))
    authority = _certs.load_authority(certs.certs_dir)
    now = datetime.datetime.now(datetime.UTC)
    cert_file, key_file = _certs.write_leaf(
        authority,
        tmp_path,
        "client",
        not_before=now - datetime.timedelta(days=10),
        not_after=now - datetime.timedelta(days=1),
    )
    expired = txrpc.Credentials(tls=txrpc.TLSConfig(ca_file=certs.ca_file, cert_file=cert_file, key_file=key_file))
    with pytest.raises(txrpc.Unauthenticated):
        await whoami(server.port, credentials=expired)
    await assert_still_serving(server.port, certs)


async def test_client_rejects_a_server_it_does_not_trust(
    serve: Any, certs: _certs.DevCerts, other_certs: _certs.DevCerts
) -> None:
    server = await serve(txrpc.ServerSecurity(tls=server_tls(certs, "none"), allow_anonymous=True))
    # Trusting another CA: the server's chain does not verify.
    with pytest.raises(txrpc.Unauthenticated, match=r"certificate verify failed|verification failed"):
        await whoami(server.port, credentials=txrpc.Credentials(tls=txrpc.TLSConfig(ca_file=other_certs.ca_file)))
    # Trusting the right CA but expecting another name: hostname verification fails.
    wrong_name = txrpc.Credentials(tls=txrpc.TLSConfig(ca_file=certs.ca_file), server_name="bank.example")
    with pytest.raises(txrpc.Unauthenticated):
        await whoami(server.port, credentials=wrong_name)
    assert (await whoami(server.port, credentials=client_creds(certs, None)))["identity"] == "anonymous"


async def test_plain_tcp_client_cannot_talk_to_a_tls_server(serve: Any, certs: _certs.DevCerts) -> None:
    server = await serve(txrpc.ServerSecurity(tls=server_tls(certs)))
    with pytest.raises(txrpc.RpcError):
        await whoami(server.port, limits=txrpc.Limits(retries_max=0, connect_timeout_s=3))
    await assert_still_serving(server.port, certs)


async def test_tls_handshake_that_never_starts_is_closed_at_handshake_timeout(
    serve: Any, certs: _certs.DevCerts
) -> None:
    server = await serve(txrpc.ServerSecurity(tls=server_tls(certs)), limits=txrpc.Limits(handshake_timeout_s=0.3))
    silent = [await trio.open_tcp_stream("127.0.0.1", server.port) for _ in range(20)]
    await trio.sleep(0.1)
    assert server.connection_count == 20
    with trio.fail_after(5):
        for stream in silent:
            assert await stream.receive_some(1024) == b""  # closed by the server
        while server.connection_count:
            await trio.sleep(0.01)
    for stream in silent:
        await stream.aclose()
    await assert_still_serving(server.port, certs)


# --- bearer tokens ------------------------------------------------------------------------


def test_hmac_tokens_check_signature_and_expiry() -> None:
    now = 1_900_000_000.0
    clock = [now]
    verifier = HmacTokenVerifier(SECRET, wall_clock=lambda: clock[0], leeway_s=5)
    token = mint_token(SECRET, "alice", roles=["admin"], ttl_s=60, now=now)
    assert verifier.verify(token) == Principal("alice", frozenset({"admin"}), "token")
    clock[0] = now + 64  # within the leeway
    assert verifier.verify(token).name == "alice"
    clock[0] = now + 66
    with pytest.raises(txrpc.Unauthenticated, match="expired"):
        verifier.verify(token)
    clock[0] = now
    forged = mint_token(bytes(32), "alice", roles=["admin"], ttl_s=60, now=now)
    with pytest.raises(txrpc.Unauthenticated, match="signature"):
        verifier.verify(forged)
    # Changing the claims (say, adding a role) breaks the signature.
    prefix, _claims, signature = token.split(".")
    other_claims = mint_token(SECRET, "alice", roles=["admin", "peer"], ttl_s=60, now=now).split(".")[1]
    with pytest.raises(txrpc.Unauthenticated, match="signature"):
        verifier.verify(f"{prefix}.{other_claims}.{signature}")
    for junk in ("", "x", "txrpc1..", "txrpc1.a.b", "a.b.c", "txrpc1." + "A" * 5000 + ".x", "txrpc1.!!.??"):
        with pytest.raises(txrpc.Unauthenticated):
            verifier.verify(junk)
    # Rotation: a verifier with the new and the old secret accepts both.
    rotated = HmacTokenVerifier(bytes(32), SECRET, wall_clock=lambda: now)
    assert rotated.verify(token).name == rotated.verify(forged).name == "alice"
    with pytest.raises(ValueError):
        HmacTokenVerifier(b"short")


@pytest.mark.parametrize("tls", [False, True], ids=["tcp", "tls"])
async def test_tokens_over_the_wire(serve: Any, certs: _certs.DevCerts, tls: bool) -> None:
    security = txrpc.ServerSecurity(
        tls=server_tls(certs, "none") if tls else None, token_verifier=HmacTokenVerifier(SECRET)
    )
    server = await serve(security)
    base = client_creds(certs, None) if tls else txrpc.Credentials()

    def creds(token: str | None) -> txrpc.Credentials:
        return txrpc.Credentials(tls=base.tls, token=token)

    good = mint_token(SECRET, "alice", roles=["admin"])
    assert await whoami(server.port, credentials=creds(good)) == {"identity": "alice", "roles": ["admin"]}
    # A function minting a fresh token at every connect.
    assert (await whoami(server.port, credentials=creds(None).__class__(tls=base.tls, token=lambda: good)))[
        "identity"
    ] == "alice"
    expired = mint_token(SECRET, "alice", ttl_s=1, now=1_000_000.0)
    forged = mint_token(b"not the server's secret!", "alice", roles=["admin"])
    for bad, why in ((expired, "expired"), (forged, "signature"), (None, "no credentials"), ("junk", "malformed")):
        with pytest.raises(txrpc.Unauthenticated, match=why) as info:
            await whoami(server.port, credentials=creds(bad))
        assert info.value.nothing_ran
    with trio.fail_after(5):
        while server.connection_count:  # every refused connection was closed
            await trio.sleep(0.01)
    assert (await whoami(server.port, credentials=creds(good)))["identity"] == "alice"


async def test_refused_hello_gets_unauthenticated_goaway_and_close(serve: Any) -> None:
    """At the wire: a hello with a bad token is answered goaway UNAUTHENTICATED, then EOF."""
    from txrpc import _connection as wire

    server = await serve(txrpc.ServerSecurity(token_verifier=HmacTokenVerifier(SECRET)))
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    conn = wire.Connection(wire.Role.CLIENT)
    await stream.send_all(conn.send_hello(auth={"bearer": "txrpc1.e30.AAAA"}))
    events: list[Any] = []
    with trio.fail_after(5):
        while not any(isinstance(e, wire.ConnectionClosed) for e in events):
            events += conn.receive_data(bytes(await stream.receive_some(65536)))
    goaway = events[0]
    assert isinstance(goaway, wire.GoAway) and goaway.code == txrpc.Code.UNAUTHENTICATED
    await stream.aclose()


# --- authorization ------------------------------------------------------------------------


async def test_method_rules_and_server_overrides(serve: Any) -> None:
    verifier = HmacTokenVerifier(SECRET)
    server = await serve(txrpc.ServerSecurity(token_verifier=verifier, rules={"open_to_all": ["auditor"]}))
    user = txrpc.Credentials(token=mint_token(SECRET, "user"))
    admin = txrpc.Credentials(token=mint_token(SECRET, "root", roles=["admin"]))
    async with txrpc.connect("127.0.0.1", server.port, credentials=user) as client:
        with pytest.raises(txrpc.PermissionDenied, match="admin_only") as info:
            await client.admin_only()
        assert info.value.nothing_ran
        with pytest.raises(txrpc.PermissionDenied):
            await client.open_to_all()  # the server's rule overrides (no rule declared)
        assert (await client.whoami())["identity"] == "user"  # the connection is still good
    async with txrpc.connect("127.0.0.1", server.port, credentials=admin) as client:
        assert await client.admin_only() == "done"


async def test_without_security_everything_is_open() -> None:
    server = txrpc.Server(make_service())
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve_tcp, "127.0.0.1", 0)
        async with txrpc.connect("127.0.0.1", server.port) as client:
            assert await client.admin_only() == "done"
            assert (await client.whoami())["identity"] == "anonymous"
        await server.shutdown(grace_s=1)


def test_rules_are_validated() -> None:
    svc = txrpc.Service("s", allow=txrpc.ROLE_PEER)
    spec = svc.add_method(lambda: None, name="m")
    assert spec.allow == frozenset({"peer"})
    assert svc.add_method(lambda: None, name="n", allow=["admin"]).allow == frozenset({"admin"})
    with pytest.raises(TypeError):
        svc.add_method(lambda: None, name="o", allow="admin")
    with pytest.raises(ValueError):
        svc.add_method(lambda: None, name="p", allow=[])
    with pytest.raises(ValueError, match="authenticate nobody"):
        txrpc.ServerSecurity()


# --- idempotency keys are scoped per authenticated identity ----------------------------


async def test_one_identity_cannot_replay_another_identitys_response(sqlite_url: str) -> None:
    runs: list[str] = []
    svc = txrpc.Service()

    @svc.method
    async def charge(amount: int) -> dict[str, Any]:
        who = txrpc.current_call().identity
        runs.append(who)
        return {"charged": amount, "for": who, "run": len(runs)}

    security = txrpc.ServerSecurity(token_verifier=HmacTokenVerifier(SECRET))
    async with storage.open_storage(sqlite_url) as st, trio.open_nursery() as nursery:
        server = txrpc.Server(svc, request_log=st, security=security)
        await nursery.start(server.serve_tcp, "127.0.0.1", 0)

        async def charge_as(name: str, amount: int) -> txrpc.Reply:
            creds = txrpc.Credentials(token=mint_token(SECRET, name))
            async with txrpc.connect("127.0.0.1", server.port, credentials=creds) as client:
                keyed = client.options(idempotency_key="order-42", with_metadata=True)
                reply: txrpc.Reply = await keyed.charge(amount)
                return reply

        first = await charge_as("alice", 10)
        assert first.value == {"charged": 10, "for": "alice", "run": 1} and not first.replayed
        # Mallory guesses alice's key: she gets her own execution, never alice's response.
        stolen = await charge_as("mallory", 10)
        assert stolen.value == {"charged": 10, "for": "mallory", "run": 2} and not stolen.replayed
        # Nor does a different payload under the same key collide with alice's record.
        assert (await charge_as("mallory2", 99)).value["for"] == "mallory2"
        again = await charge_as("alice", 10)
        assert again.replayed and again.value == first.value
        assert runs == ["alice", "mallory", "mallory2"]
        await server.shutdown(grace_s=1)


def test_tls_contexts_always_verify(certs: _certs.DevCerts) -> None:
    context = txrpc.TLSConfig(ca_file=certs.ca_file).client_context()
    assert context.verify_mode is ssl.CERT_REQUIRED and context.check_hostname
    assert server_tls(certs).server_context().verify_mode is ssl.CERT_REQUIRED
    assert txrpc.ServerSecurity(tls=server_tls(certs)).client_cert_required
    assert server_tls(certs, "optional").server_context().verify_mode is ssl.CERT_OPTIONAL
    with pytest.raises(ValueError):
        txrpc.TLSConfig(ca_file=certs.ca_file).server_context()  # a server needs its certificate
    with pytest.raises(ValueError):
        txrpc.TLSConfig(client_cert="maybe")  # type: ignore[arg-type]
