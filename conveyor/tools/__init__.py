"""Adapters for external peer tools (RELION, MotionCor2, CTFFIND4, spi_processing, spi_em_class, Dragonfly)."""
