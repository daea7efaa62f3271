"""The model library: pull models from the hub (ready GGUFs, or safetensors through our
converter), import local files, list and remove them, each with a manifest of where it came from.

Nothing here imports the API or the engine: the CLI runs it in-process, the daemon in its own
bounded worker threads (appliance.library.jobs).
"""
