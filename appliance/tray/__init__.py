"""The system-tray icon: a separate process that watches and drives the daemon over its API."""
