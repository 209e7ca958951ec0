--------------------------- MODULE MCDeepLiveness ---------------------------
\* Larger liveness configuration (constants in MCDeepLiveness.cfg), `make spec-deep`.
EXTENDS CommitProtocol
=============================================================================
