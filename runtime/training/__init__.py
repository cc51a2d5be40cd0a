"""Training BlockPilot's own DFlash drafter: prompt sets, target-response data, the training loop."""
