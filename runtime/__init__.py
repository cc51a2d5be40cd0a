"""BlockPilot runtime: models, DFlash drafter, batched speculative engine, policy inference."""
