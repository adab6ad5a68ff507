"""Cryo-EM single-particle analysis: motion, CTF, picking, extraction, classification, reconstruction."""
