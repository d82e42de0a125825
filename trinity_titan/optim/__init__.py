"""Muon for the hidden matrices and AdamW for the rest (one HybridMuon), its sharded Newton-Schulz, and the TrainSpec's optimizer builder."""
