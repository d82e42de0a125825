"""The training-loop pieces: the loss and its statistics, metrics, the NaN guard, expert-bias balancing, and the one job check."""
