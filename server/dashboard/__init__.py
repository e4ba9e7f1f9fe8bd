"""The operator dashboard: a read-only web view of the state store (``server/state/``).

``fleetlora dashboard`` serves it (``cli.py``); ``app.py`` is the FastAPI app and its JSON API;
``auth.py`` the token check; ``static/`` the pages, which draw their charts as SVG in the browser.
"""
