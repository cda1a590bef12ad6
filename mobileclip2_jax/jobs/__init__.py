"""Config → objects → run, one module per job; ``launch/`` scripts only parse flags and call these."""
