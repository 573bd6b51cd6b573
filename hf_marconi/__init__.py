"""hf_marconi: Marconi prefix caching for hybrid LLMs in transformers."""

__version__ = "0.1.0"
