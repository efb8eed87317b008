"""lm-eval integration: the `ffv-patched` model and the hook that registers it and the project's tasks."""
