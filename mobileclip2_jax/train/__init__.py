"""Train state and the jitted, globally sharded train step (the loop and checkpoints follow)."""
