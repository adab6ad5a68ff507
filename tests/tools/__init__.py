"""Tests of the peer-tool adapters (conveyor.tools)."""
