"""Clients of other services' HTTP APIs, importable without the engines (no torch, no diffusers)."""
