"""Model names to local folders: the packaged defaults offline, the GGUF to Hugging Face conversion."""
