"""Pretraining data: HF sources, mixture phases, RSDB or sequential packing, batch-size ramp."""
