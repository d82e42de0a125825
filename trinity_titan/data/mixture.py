"""Multi-phase dataset mixtures: each phase has a token budget and one weight per source.

The source of every next document is a weighted random choice (own seeded RNG, checkpointed) under
the weights of the phase the run is in, measured in training tokens emitted so far; the loader
switches phase as soon as the emitted tokens reach the phase boundary (the cumulative budgets).
The last phase continues past its budget. With RSDB, documents already buffered are still read
out after a switch (new documents follow the new weights). A finite source that runs out is dropped from the
choice; when no source with weight is left the stream ends.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
from torchtitan.tools.logging import logger

from trinity_titan.data.packing import DocAddress, OpenDocument
from trinity_titan.job_config import ConfigError


class DocumentSource(Protocol):
    """A resumable stream of tokenized documents, each with its (epoch, block, index) address
    (None for a hub dataset); see data/sources.py."""

    def next(self) -> tuple[np.ndarray, tuple[int, int, int] | None]: ...  # StopIteration at end

    def fetch(self, address: tuple[int, int, int]) -> np.ndarray: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class PhaseSchedule:
    """Phase i covers training tokens [sum(budgets[:i]), sum(budgets[:i+1]))."""

    def __init__(self, budgets: list[int], weights: list[list[float]]):
        if len(budgets) != len(weights) or not budgets:
            raise ConfigError(
                f"[[data.phases]]: need one weight list per phase: {len(budgets)} budgets, "
                f"{len(weights)} weights"
            )
        widths = {len(w) for w in weights}
        if len(widths) != 1:
            raise ConfigError(
                f"[[data.phases]]: every phase needs one weight per source, got widths {widths}"
            )
        if any(b <= 0 for b in budgets) or any(min(w) < 0 or sum(w) <= 0 for w in weights):
            raise ConfigError(
                "[[data.phases]]: tokens must be > 0 and weights >= 0 with a positive sum"
            )
        self.boundaries = np.cumsum(np.asarray(budgets, dtype=np.int64)).tolist()
        self.weights = [np.asarray(w, dtype=np.float64) for w in weights]

    def check_sources(self, n: int) -> None:
        if len(self.weights[0]) != n:
            raise ConfigError(
                f"[[data.phases]] give {len(self.weights[0])} weights for {n} [[data.sources]]. "
                "Fix: one weight per source in every phase."
            )

    @classmethod
    def single(cls, weights: list[float]) -> PhaseSchedule:
        return cls([1], [weights])

    def phase_at(self, tokens: int) -> int:
        for i, end in enumerate(self.boundaries):
            if tokens < end:
                return i
        return len(self.boundaries) - 1


class Mixture:
    """Draws documents from `sources` under the phase weights at the current token count."""

    def __init__(self, sources: list[DocumentSource], schedule: PhaseSchedule, seed):
        schedule.check_sources(len(sources))
        self.sources = sources
        self.schedule = schedule
        self._rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed)))
        self._exhausted = [False] * len(sources)
        self.drawn = [0] * len(sources)  # documents per source, for logs and tests
        self.phase = 0

    def next_document(self, tokens: int) -> OpenDocument:
        """The next document, its source chosen under the weights of the phase at `tokens`."""
        phase = self.schedule.phase_at(tokens)
        if phase != self.phase:
            logger.info(
                f"Data phase {phase + 1}/{len(self.schedule.boundaries)} from {tokens} tokens"
            )
            self.phase = phase
        weights = self.schedule.weights[phase]
        while True:
            live = np.where(self._exhausted, 0.0, weights)
            if live.sum() <= 0:
                raise StopIteration
            i = int(self._rng.choice(len(live), p=live / live.sum()))
            try:
                doc, address = self.sources[i].next()
            except StopIteration:
                self._exhausted[i] = True
                continue
            self.drawn[i] += 1
            return OpenDocument(doc, None if address is None else (i, *address))

    def fetch(self, address: DocAddress) -> np.ndarray:
        """The tokens of the local document at `address` (source, epoch, block, index)."""
        return self.sources[address[0]].fetch(address[1:])

    def state_dict(self) -> dict[str, Any]:
        return {
            "rng": self._rng.bit_generator.state,
            "exhausted": list(self._exhausted),
            "drawn": list(self.drawn),
            "phase": self.phase,
            "sources": [s.state_dict() for s in self.sources],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["rng"] is not None:  # None: a reshard's new reader keeps its fresh seed
            self._rng.bit_generator.state = state["rng"]
        self._exhausted = list(state["exhausted"])
        self.drawn = list(state["drawn"])
        self.phase = int(state["phase"])
        for source, s in zip(self.sources, state["sources"], strict=True):
            source.load_state_dict(s)
