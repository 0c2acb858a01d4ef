"""The command line, ``python -m manage``: what ``make`` and ``serve.sh`` call to register, route, import and check."""
