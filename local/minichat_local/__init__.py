"""Local mode: the whole MiniChat on one machine and one origin, no cloud."""
