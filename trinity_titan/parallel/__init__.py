"""How TorchTitan's parallelisms apply to the Trinity model (TP, EP, Trinity's own CP, FSDP/HSDP) and the degree checks; the model code knows none of it."""
