"""Test-wide fixtures: generated tiny GGUF models and the packaged models."""

pytest_plugins = ["tests.fixtures.model_fixtures", "tests.integration.server"]
