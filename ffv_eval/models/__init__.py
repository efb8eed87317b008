"""The model: loading any Hugging Face causal LM (device, dtype, fingerprint), one architecture
adapter per family, and the nnsight patching every vector goes through."""
