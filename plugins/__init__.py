"""Integrations of BlockPilot into serving frameworks (SGLang)."""
