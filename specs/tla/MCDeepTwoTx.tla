---------------------------- MODULE MCDeepTwoTx ----------------------------
\* Two transactions (constants in MCDeepTwoTx.cfg), `make spec-deep`.
EXTENDS CommitProtocol, TLC

Symmetry == Permutations(Part)

\* State constraint: the second transaction begins only after the coordinator
\* crashed.  The two transactions share nothing but the coordinator process and
\* its id counter, and each one alone is checked exhaustively by the other
\* configurations; unconstrained, the product of their state spaces is too large
\* to check (> 15 M states after 15 min).  This keeps what only two transactions
\* show: a txid handed out by the restarted process next to one that was in
\* flight at the crash (presumed aborted, its participants querying).
SecondBegunAfterRestart == clPhase[2] = "idle" \/ cCrashes > 0
=============================================================================
