"""Everything that runs a model or lm-eval to measure: the main job (compare), leaderboard runs,
the vector-quality gate, alignment with human judgments and the CFV posteriors behind
explain-cfv. reports/ reads what these write."""
