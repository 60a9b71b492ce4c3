"""Storage backends behind :class:`agents.device.BlockDevice`."""
