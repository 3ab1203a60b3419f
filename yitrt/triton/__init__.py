"""Triton deployment: the repository writer, yitrt's Python models, server launch and the chat client."""
