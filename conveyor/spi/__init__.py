"""XFEL single-particle imaging: hits, centre, size, classification, EMC, phasing."""
