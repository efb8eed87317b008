"""Function vectors: extracted (FV), fine-tuned (FFV), the basis and composite (CFV), decoded,
stored as safetensors + JSON, and the jobs that make them."""
