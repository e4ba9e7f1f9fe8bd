"""Fixtures of the server tests: the headless browser of the dashboard's browser tests."""

from tests.server.browser import browser, page  # noqa: F401 - for test_dashboard_e2e.py and test_dashboard_stores.py
