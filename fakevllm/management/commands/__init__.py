"""Management commands of the fakevllm app."""
