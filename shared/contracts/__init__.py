"""The contracts every service shares: pure, no I/O, importing nothing else of the project."""
