"""Interoperability with other formats: Hugging Face transformers folders (hf.py), llama.cpp
GGUF files (gguf.py) and the `moefold convert` / `moefold upcycle` commands (commands.py).

Importing this package imports nothing else; transformers is never a runtime dependency.
"""
