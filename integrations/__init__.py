"""Adapters for other ecosystems, each imported on its own (`ragtune.integrations.langchain`) so that
ragtune never imports a framework it is not asked for."""
