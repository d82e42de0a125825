"""Every TorchTitan 0.2.2 and CPU work-around, in one place."""
