"""Per-rank state dicts for the Megatron runner: from a checkpoint folder, a mapping or a callable.

File names and loading are stepconv.megatron_io's (one implementation of the legacy format).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Callable, Union

from ..megatron_io import RANK_FILE, TRACKER, iteration_dir_name, load_rank_file
from ..megatron_io import rank_dir_name as _rank_dir_name

CKPT_BASENAME = RANK_FILE


def rank_dir_name(tp_rank: int, pp_rank: int, ep_rank: int, *, pp: int, ep: int) -> str:
    return _rank_dir_name(tp_rank, pp_rank, ep_rank, pp, ep)


def resolve_checkpoint_dir(path: Union[str, Path]) -> Path:
    """The directory holding the ``mp_rank_*`` folders.

    Accepts the checkpoint root (uses ``latest_checkpointed_iteration.txt`` if present, else
    ``release/``) or the ``release``/``iter_*`` directory itself.
    """
    p = Path(path)
    tracker = p / TRACKER
    if tracker.is_file():
        tag = tracker.read_text().strip()
        sub = p / iteration_dir_name(tag if tag == "release" else int(tag))
        if sub.is_dir():
            return sub
    if (p / "release").is_dir():
        return p / "release"
    if any(p.glob("mp_rank_*")):
        return p
    raise FileNotFoundError(f"no megatron legacy checkpoint (mp_rank_* folders) under {p}")


def load_rank_state_dict(path: Union[str, Path], tp_rank: int, pp_rank: int, ep_rank: int, *,
                         pp: int, ep: int) -> dict:
    f = resolve_checkpoint_dir(path) / rank_dir_name(tp_rank, pp_rank, ep_rank, pp=pp, ep=ep) / RANK_FILE
    return dict(load_rank_file(f)["model"])


class CheckpointDirLoader:
    """Picklable ``(tp_rank, pp_rank, ep_rank) -> state_dict`` over a checkpoint directory."""

    def __init__(self, path: Union[str, Path], *, pp: int, ep: int):
        self.path = str(path)
        self.pp, self.ep = pp, ep
        resolve_checkpoint_dir(self.path)  # fail early, in the caller

    def __call__(self, tp_rank: int, pp_rank: int, ep_rank: int) -> dict:
        return load_rank_state_dict(self.path, tp_rank, pp_rank, ep_rank, pp=self.pp, ep=self.ep)


class MappingLoader:
    """Picklable loader over ``{(tp_rank, pp_rank, ep_rank): state_dict}``."""

    def __init__(self, mapping: Mapping):
        self.mapping = dict(mapping)

    def __call__(self, tp_rank: int, pp_rank: int, ep_rank: int) -> dict:
        return self.mapping[(tp_rank, pp_rank, ep_rank)]


RankLoader = Union[str, Path, Mapping, Callable[[int, int, int], dict]]


def as_rank_loader(loader: RankLoader, *, pp: int, ep: int) -> Callable[[int, int, int], dict]:
    """Normalise the accepted loader forms: a checkpoint directory (root, ``release`` or ``iter_*``),
    a mapping ``{(tp_rank, pp_rank, ep_rank): state_dict}``, or a picklable callable."""
    if isinstance(loader, (str, Path)):
        return CheckpointDirLoader(loader, pp=pp, ep=ep)
    if isinstance(loader, Mapping):
        return MappingLoader(loader)
    if callable(loader):
        return loader
    raise TypeError(f"unsupported rank loader {type(loader).__name__}")
