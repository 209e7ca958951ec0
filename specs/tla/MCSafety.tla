------------------------------ MODULE MCSafety ------------------------------
\* Small safety configuration (constants in MCSafety.cfg), run by `make test`.
EXTENDS CommitProtocol, TLC

\* Participants are interchangeable.  (Symmetry is for safety runs only: it is
\* unsound for liveness checking.)
Symmetry == Permutations(Part)
=============================================================================
