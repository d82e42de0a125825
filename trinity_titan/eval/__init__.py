"""Evaluations of Trinity checkpoints."""
