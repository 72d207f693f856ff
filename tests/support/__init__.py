"""Helpers shared by the tests: configurations and tokens, clients, servers, databases, waiting. Fixtures stay in
tests/conftest.py; import helpers from the module that defines them."""
