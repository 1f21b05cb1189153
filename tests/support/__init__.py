"""Test helpers shared by unit and integration tests (reference implementations, builders)."""
