"""Model knowledge: normalised configs, the Yi checkpoint registry and the Llama-family tensor table."""
