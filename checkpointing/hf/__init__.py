"""Hugging Face directories in and out: one mapping per architecture family (``llama``/``mistral``/
``qwen3`` in dense.py, ``qwen3_moe``, ``gemma3``, ``olmo2``, ``deepseek_v3``), the shared name table
(mapping.py), safetensors by byte range (safetensors_io.py) and the sharded import (load.py)."""
