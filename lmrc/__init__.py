"""lmrc: document-level relation extraction with an LLM and a relation classifier."""

__version__ = "0.1.0"
