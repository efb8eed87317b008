"""What is read off results and vectors: leaderboards, the quality gate, FV/FFV alignment, comparisons."""
