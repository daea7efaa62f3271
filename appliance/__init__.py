"""Qwen Appliance: a local LLM daemon, its tray icon and its model converter."""

__version__ = "0.1.0"
