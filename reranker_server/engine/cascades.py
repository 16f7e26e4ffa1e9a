"""`Cascades`: the engines a server runs, by cascade name, and which one a `model` name picks.

Each cascade (cascade_file.py) is one `Engine`. Engines share what is process-wide: the CPU
scheduler (its threads own the cores), the GPU scheduler and gate, the score cache, and any
runner two cascades both use (engine/loader.py loads each model once).

A request's `model` picks a cascade by, in turn: cascade name, alias, the name of a model a
cascade serves (its final model first). Anything else goes to the default cascade.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from ..cascade_file import DEFAULT_NAME
from .engine import Engine
from .scheduler import Scheduler


@dataclass(frozen=True)
class ServedCascade:
    """One loaded cascade."""

    name: str
    engine: Engine
    aliases: tuple[str, ...] = ()
    default: bool = False


class Cascades:
    """The loaded cascades, the default one first."""

    def __init__(self, cascades: Sequence[ServedCascade]) -> None:
        if not cascades:
            raise ValueError("no cascades")
        defaults = [c for c in cascades if c.default] or [cascades[0]]
        self.default = defaults[0]
        self._by_name = {c.name: c for c in [self.default, *cascades]}  # default first
        self._lookup: dict[str, ServedCascade] = {}
        for cascade in self:
            for name in (cascade.name, *cascade.aliases):
                self._lookup.setdefault(name, cascade)
        for cascade in self:  # then model names: a cascade's final model, then its stage 1
            status = cascade.engine.status()
            final = status.stage2 or status.stage1
            self._lookup.setdefault(final.name, cascade)
        for cascade in self:
            for model in sorted(cascade.engine.status().model_names()):
                self._lookup.setdefault(model, cascade)

    @classmethod
    def single(cls, engine: Engine) -> Cascades:
        """One engine as the `default` cascade (a server without a cascades file)."""
        return cls([ServedCascade(DEFAULT_NAME, engine, default=True)])

    def __iter__(self) -> Iterator[ServedCascade]:
        return iter(self._by_name.values())

    def __len__(self) -> int:
        return len(self._by_name)

    def find(self, model: str | None) -> ServedCascade | None:
        """The cascade `model` names (None: not one of its names)."""
        return self._lookup.get(model) if model is not None else None

    def pick(self, model: str | None) -> ServedCascade:
        """The cascade for a request's `model`: the one it names, else the default."""
        return self.find(model) or self.default

    def cascade_names(self) -> set[str]:
        """Cascade names and aliases."""
        return {name for c in self for name in (c.name, *c.aliases)}

    def names(self) -> set[str]:
        """Every name that picks a cascade: cascade names, aliases, model names."""
        return set(self._lookup)

    def schedulers(self) -> dict[str, Scheduler]:
        """The schedulers the engines use, each once ("cpu", "gpu"; more only if engines were
        built apart)."""
        found: dict[str, Scheduler] = {}
        seen: set[int] = set()
        for cascade in self:
            for name, scheduler in cascade.engine.schedulers().items():
                if id(scheduler) in seen:
                    continue
                seen.add(id(scheduler))
                key = name if name not in found else f"{name}-{cascade.name}"
                found[key] = scheduler
        return found

    def close(self) -> None:
        """Stop every engine's scheduler threads (queued work finishes first)."""
        for cascade in self:
            cascade.engine.close()
