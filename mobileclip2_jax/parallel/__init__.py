"""Device mesh and parameter sharding rules for the train step (``("data", "fsdp")`` axes)."""
