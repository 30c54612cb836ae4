"""The OpenAI-compatible local server (app, engine) and session snapshots."""
