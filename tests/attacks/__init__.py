"""Attacks on a live fluxrt, one area per module; docs/security.md names each test that proves an answer."""
