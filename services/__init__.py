"""The six neurons services; each folder reads domain.py, app.py, adapters, __main__.py."""
