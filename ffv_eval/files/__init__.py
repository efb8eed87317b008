"""Files, safely: atomic writes, locks, content hashes, JSON lines."""
