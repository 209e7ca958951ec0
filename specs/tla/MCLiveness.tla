----------------------------- MODULE MCLiveness -----------------------------
\* Small liveness configuration (constants in MCLiveness.cfg), run by `make test`.
\* No symmetry here: TLC's symmetry reduction is unsound for liveness.
EXTENDS CommitProtocol
=============================================================================
