"""txrpc — transactional RPC for trio: CBOR framing, deadlines, cancellation, and
(in the packages built on it) idempotency keys, sharding and two-phase commit.

The public API is re-exported here; modules starting with ``_`` are private.
"""

from ._client import BoundClient, CallOptions, Client, MethodProxy, Reply, connect
from ._cluster import Cluster, Transaction, cluster
from ._connection import PROTOCOL_VERSIONS
from ._errors import (
    Abort,
    Aborted,
    AlreadyExists,
    Cancelled,
    Code,
    DataLoss,
    DeadlineExceeded,
    FailedPrecondition,
    IdempotencyKeyMismatch,
    Internal,
    InvalidArgument,
    MethodNotFound,
    NotFound,
    OutcomeUnknown,
    OutOfRange,
    PermissionDenied,
    ProtocolError,
    RequestInProgress,
    ResourceExhausted,
    RpcError,
    TransactionAborted,
    Unauthenticated,
    Unavailable,
    Unimplemented,
    UnknownError,
    WrongEpoch,
)
from ._limits import Limits
from ._ring import HashRing, RangeMove, RebalancePlan, RingNode, key_hash, partition_of
from ._routing import EPOCH_METADATA_KEY, ClusterClient, EpochGuard, check_epoch
from ._server import Server, serve
from ._service import CallContext, MethodSpec, Service, current_call
from ._shardmap import ClusterConfig, ConfigError, CoordinatorSpec, NodeSpec, ShardMap, load_cluster_config

__version__ = "0.1.0"

__all__ = [
    "EPOCH_METADATA_KEY",
    "Cluster",
    "ClusterClient",
    "ClusterConfig",
    "ConfigError",
    "CoordinatorSpec",
    "EpochGuard",
    "HashRing",
    "NodeSpec",
    "RangeMove",
    "RebalancePlan",
    "RingNode",
    "ShardMap",
    "Transaction",
    "check_epoch",
    "cluster",
    "key_hash",
    "load_cluster_config",
    "partition_of",
    "Abort",
    "OutcomeUnknown",
    "TransactionAborted",
    "PROTOCOL_VERSIONS",
    "Aborted",
    "AlreadyExists",
    "BoundClient",
    "CallContext",
    "CallOptions",
    "Cancelled",
    "Client",
    "Code",
    "DataLoss",
    "DeadlineExceeded",
    "FailedPrecondition",
    "IdempotencyKeyMismatch",
    "Internal",
    "InvalidArgument",
    "Limits",
    "MethodNotFound",
    "MethodProxy",
    "MethodSpec",
    "NotFound",
    "OutOfRange",
    "PermissionDenied",
    "ProtocolError",
    "Reply",
    "RequestInProgress",
    "ResourceExhausted",
    "RpcError",
    "Server",
    "Service",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "UnknownError",
    "WrongEpoch",
    "__version__",
    "connect",
    "current_call",
    "serve",
]
