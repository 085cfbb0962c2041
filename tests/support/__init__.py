"""Helpers the tests share (servers, references, protocol requests): test modules import these,
never each other or another folder's conftest."""
