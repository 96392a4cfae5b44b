"""Inference: request preparation (host) and the jitted encode / prefill / decode programs (device)."""
