"""Per-rank state dicts for the Megatron runner: from a checkpoint folder, a mapping or a callable.

Folder and file names, the iteration folder and loading are stepconv.megatron_io's (one implementation of
the legacy format).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Callable, Union

from ..megatron_io import RANK_FILE, load_rank_file, rank_dir_name, resolve_iteration


class CheckpointDirLoader:
    """Picklable ``(tp_rank, pp_rank, ep_rank) -> state_dict`` over a checkpoint folder.

    ``path``: a checkpoint root (the tracker names the iteration) or an iteration folder itself; resolved
    once, here, so that a wrong path fails in the caller rather than in every rank.
    """

    def __init__(self, path: Union[str, Path], *, pp: int, ep: int):
        self.itdir = resolve_iteration(path).path
        self.pp, self.ep = pp, ep

    def __call__(self, tp_rank: int, pp_rank: int, ep_rank: int) -> dict:
        f = self.itdir / rank_dir_name(tp_rank, pp_rank, ep_rank, self.pp, self.ep) / RANK_FILE
        return dict(load_rank_file(f)["model"])


class MappingLoader:
    """Picklable loader over ``{(tp_rank, pp_rank, ep_rank): state_dict}``."""

    def __init__(self, mapping: Mapping):
        self.mapping = dict(mapping)

    def __call__(self, tp_rank: int, pp_rank: int, ep_rank: int) -> dict:
        return self.mapping[(tp_rank, pp_rank, ep_rank)]


RankLoader = Union[str, Path, Mapping, Callable[[int, int, int], dict]]


def as_rank_loader(loader: RankLoader, *, pp: int, ep: int) -> Callable[[int, int, int], dict]:
    """Normalise the accepted loader forms: a checkpoint folder (root with the tracker, or ``release`` /
    ``iter_*``), a mapping ``{(tp_rank, pp_rank, ep_rank): state_dict}``, or a picklable callable."""
    if isinstance(loader, (str, Path)):
        return CheckpointDirLoader(loader, pp=pp, ep=ep)
    if isinstance(loader, Mapping):
        return MappingLoader(loader)
    if callable(loader):
        return loader
    raise TypeError(f"unsupported rank loader {type(loader).__name__}")
