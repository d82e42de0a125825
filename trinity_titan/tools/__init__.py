"""Command-line tools, apart from the runtime: planner, memory estimate, benchmark, checkpoint conversion, NIAH evaluation."""
