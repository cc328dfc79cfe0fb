"""Adapter files: this pack's .safetensors format and the authors' checkpoint (read with weights_only)."""
