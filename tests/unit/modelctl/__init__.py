"""Unit tests of modelctl against a fake daemon."""
