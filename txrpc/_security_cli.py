"""`txrpc certs dev` and `txrpc token mint`, and the TLS/token options of `serve` and `call`."""

from __future__ import annotations

from pathlib import Path

import click

from ._security import Credentials, HmacTokenVerifier, ServerSecurity, TLSConfig, load_secret, mint_token

DEFAULT_NAMES = ("server", "client", "admin")


def _duration(text: str) -> float:
    from ._serve import parse_duration

    return parse_duration(text)


def server_security_from_options(
    tls_cert: str | None,
    tls_key: str | None,
    tls_ca: str | None,
    client_cert: str | None,
    token_secret_file: str | None,
    allow_anonymous: bool,
    roles: tuple[str, ...],
) -> ServerSecurity | None:
    """``txrpc serve``'s security options as a :class:`ServerSecurity` (None: all off)."""
    if not (tls_cert or tls_key or tls_ca or token_secret_file or client_cert or roles):
        if allow_anonymous:
            raise click.UsageError("--allow-anonymous needs --tls-cert/--tls-key or --token-secret-file")
        return None
    tls: TLSConfig | None = None
    if tls_cert or tls_key or tls_ca:
        if not (tls_cert and tls_key):
            raise click.UsageError("TLS needs both --tls-cert and --tls-key")
        mode = client_cert or ("require" if tls_ca else "none")
        if mode != "none" and not tls_ca:
            raise click.UsageError(f"--client-cert {mode} needs --tls-ca (the CA client certificates chain to)")
        tls = TLSConfig(
            ca_file=Path(tls_ca) if tls_ca else None,
            cert_file=Path(tls_cert),
            key_file=Path(tls_key),
            client_cert=mode,  # type: ignore[arg-type]
        )
    elif client_cert:
        raise click.UsageError("--client-cert needs --tls-cert/--tls-key/--tls-ca")
    verifier = None
    if token_secret_file:
        try:
            verifier = HmacTokenVerifier(load_secret(token_secret_file))
        except (OSError, ValueError) as exc:
            raise click.BadParameter(str(exc), param_hint="--token-secret-file") from None
    granted: dict[str, set[str]] = {}
    for item in roles:
        identity, sep, role = item.partition("=")
        if not sep or not identity or not role:
            raise click.BadParameter(f"{item!r}: expected IDENTITY=ROLE", param_hint="--role")
        granted.setdefault(identity, set()).add(role)
    try:
        return ServerSecurity(tls=tls, token_verifier=verifier, roles=granted, allow_anonymous=allow_anonymous)
    except (OSError, ValueError) as exc:  # unreadable certificate or key, bad combination
        raise click.UsageError(f"cannot set up security: {exc}") from None


def credentials_from_options(
    use_tls: bool,
    tls_ca: str | None,
    tls_cert: str | None,
    tls_key: str | None,
    server_name: str | None,
    token: str | None,
) -> Credentials | None:
    """``txrpc call``'s options as :class:`Credentials` (None: plain TCP, no token)."""
    tls: TLSConfig | None = None
    if use_tls or tls_ca or tls_cert or tls_key:
        if bool(tls_cert) != bool(tls_key):
            raise click.UsageError("--tls-cert and --tls-key go together")
        tls = TLSConfig(
            ca_file=Path(tls_ca) if tls_ca else None,
            cert_file=Path(tls_cert) if tls_cert else None,
            key_file=Path(tls_key) if tls_key else None,
        )
    if tls is None and token is None:
        return None
    return Credentials(tls=tls, token=token, server_name=server_name)


@click.group("certs")
def certs_group() -> None:
    """Certificates for TLS and mutual TLS."""


@certs_group.command("dev")
@click.option("--out", "out_dir", default="certs", show_default=True, type=click.Path(file_okay=False))
@click.option("--name", "names", multiple=True, help="A certificate to issue (repeatable).")
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    help="Also issue one per node of this cluster file, plus coordinator, its client and admins.",
)
@click.option("--days", default=30, show_default=True, help="Validity of the CA and the certificates.")
def certs_dev(out_dir: str, names: tuple[str, ...], config_path: str | None, days: int) -> None:
    """Make a local CA and certificates for tests and the demo (NOT for production).

    Writes ca.pem/ca.key, NAME.pem/NAME.key per name (CN=NAME, valid for localhost,
    127.0.0.1 and ::1, for servers and clients) and token.secret (for bearer tokens).
    """
    from ._certs import make_dev_certs

    wanted = list(names)
    if config_path:
        from ._shardmap import ConfigError, load_cluster_config

        try:
            config = load_cluster_config(config_path)
        except ConfigError as exc:
            raise click.BadParameter(str(exc), param_hint="--config") from None
        wanted += ["coordinator", *(node.name for node in config.shard_map.nodes)]
        if config.security is not None:
            wanted += [config.security.client, *config.security.admins]
        else:
            wanted += ["client", "admin"]
    if not wanted:
        wanted = list(DEFAULT_NAMES)
    made = make_dev_certs(out_dir, wanted, days=days)
    click.echo(f"CA: {made.ca_file}")
    for name in made.names:
        click.echo(f"{name}: {made.cert_file(name)} {made.key_file(name)}")
    click.echo(f"token secret: {made.token_secret_file}")


@click.group("token")
def token_group() -> None:
    """Bearer tokens (HMAC-SHA256 with an expiry)."""


@token_group.command("mint")
@click.option("--secret-file", required=True, type=click.Path(dir_okay=False, exists=True))
@click.option("--subject", required=True, help="The identity the token names.")
@click.option("--role", "roles", multiple=True, help="A role it carries (repeatable).")
@click.option("--ttl", default="1h", show_default=True, help="Validity (90s, 15m, 24h, 7d).")
def token_mint(secret_file: str, subject: str, roles: tuple[str, ...], ttl: str) -> None:
    """Print a bearer token for SUBJECT (use with `txrpc call --token` or $TXRPC_TOKEN)."""
    try:
        secret = load_secret(secret_file)
        click.echo(mint_token(secret, subject, roles=roles, ttl_s=_duration(ttl)))
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None


def register(cli: click.Group, bench: click.Group) -> None:
    cli.add_command(certs_group)
    cli.add_command(token_group)
