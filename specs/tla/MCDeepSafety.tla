---------------------------- MODULE MCDeepSafety ----------------------------
\* Larger safety configuration (constants in MCDeepSafety.cfg), `make spec-deep`.
EXTENDS CommitProtocol, TLC

Symmetry == Permutations(Part)
=============================================================================
