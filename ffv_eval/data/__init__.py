"""Word pairs and analogy sets: the project's relations, the reference data's layouts, prompts, and the datasets lm-eval tasks read."""
