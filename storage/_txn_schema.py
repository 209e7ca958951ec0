"""Tables of the commit protocol: shard data, commit log, prepare records, coordinator
decisions and transaction-id blocks (schema migration 3)."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ._schema import metadata

shard_data = sa.Table(
    "txrpc_shard_data",
    metadata,
    sa.Column("shard", sa.String, primary_key=True),
    sa.Column("key", sa.String, primary_key=True),
    sa.Column("value", sa.LargeBinary, nullable=False),
)

commit_log = sa.Table(
    "txrpc_commit_log",
    metadata,
    sa.Column("shard", sa.String, primary_key=True),
    sa.Column("position", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("txid", sa.BigInteger, nullable=False),
    sa.Column("writes", sa.LargeBinary, nullable=False),
    sa.Column("committed_at", sa.Double, nullable=False),
)

prepared = sa.Table(
    "txrpc_prepared",
    metadata,
    sa.Column("shard", sa.String, primary_key=True),
    sa.Column("txid", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("writes", sa.LargeBinary, nullable=False),
    sa.Column("locks", sa.LargeBinary, nullable=False),
    sa.Column("prepared_at", sa.Double, nullable=False),
)

decisions = sa.Table(
    "txrpc_decisions",
    metadata,
    sa.Column("coordinator", sa.String, primary_key=True),
    sa.Column("txid", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("outcome", sa.String, nullable=False),
    sa.Column("participants", sa.LargeBinary, nullable=False),
    sa.Column("acked", sa.LargeBinary, nullable=False),
    sa.Column("done", sa.Boolean, nullable=False),
    sa.Column("heuristic", sa.Boolean, nullable=False),
    sa.Column("reason", sa.String, nullable=False),
    sa.Column("decided_at", sa.Double, nullable=False),
)

txid_blocks = sa.Table(
    "txrpc_txid_blocks",
    metadata,
    sa.Column("coordinator", sa.String, primary_key=True),
    sa.Column("block_end", sa.BigInteger, nullable=False),
)


def migration_3(conn: Connection) -> None:
    """Create the commit-protocol tables. Spelled out here (not taken from the tables
    above) so that this step stays what it was when later migrations change them."""
    md = sa.MetaData()
    sa.Table(
        "txrpc_shard_data",
        md,
        sa.Column("shard", sa.String, primary_key=True),
        sa.Column("key", sa.String, primary_key=True),
        sa.Column("value", sa.LargeBinary, nullable=False),
    )
    log = sa.Table(
        "txrpc_commit_log",
        md,
        sa.Column("shard", sa.String, primary_key=True),
        sa.Column("position", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("txid", sa.BigInteger, nullable=False),
        sa.Column("writes", sa.LargeBinary, nullable=False),
        sa.Column("committed_at", sa.Double, nullable=False),
    )
    sa.Table(
        "txrpc_prepared",
        md,
        sa.Column("shard", sa.String, primary_key=True),
        sa.Column("txid", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("writes", sa.LargeBinary, nullable=False),
        sa.Column("locks", sa.LargeBinary, nullable=False),
        sa.Column("prepared_at", sa.Double, nullable=False),
    )
    made = sa.Table(
        "txrpc_decisions",
        md,
        sa.Column("coordinator", sa.String, primary_key=True),
        sa.Column("txid", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("outcome", sa.String, nullable=False),
        sa.Column("participants", sa.LargeBinary, nullable=False),
        sa.Column("acked", sa.LargeBinary, nullable=False),
        sa.Column("done", sa.Boolean, nullable=False),
        sa.Column("heuristic", sa.Boolean, nullable=False),
        sa.Column("reason", sa.String, nullable=False),
        sa.Column("decided_at", sa.Double, nullable=False),
    )
    sa.Table(
        "txrpc_txid_blocks",
        md,
        sa.Column("coordinator", sa.String, primary_key=True),
        sa.Column("block_end", sa.BigInteger, nullable=False),
    )
    md.create_all(conn)
    sa.Index("ix_commit_log_txid", log.c.shard, log.c.txid).create(conn)
    sa.Index("ix_decisions_done", made.c.coordinator, made.c.done).create(conn)
