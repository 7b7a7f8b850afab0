"""Legacy megatron checkpoint files (``--ckpt-format torch``): names and per-rank loading.

Layout (megatron.training ``get_checkpoint_name``): ``<root>/<release|iter_NNNNNNN>/mp_rank_TT``
+ ``_PPP`` if pp > 1 + ``_EEE`` if ep > 1, each holding ``model_optim_rng.pt`` = dict with ``model``
(the rank's state dict) and ``args`` (argparse.Namespace). No megatron imports here.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path
from typing import Callable, Union

import torch

CKPT_BASENAME = "model_optim_rng.pt"


def rank_dir_name(tp_rank: int, pp_rank: int, ep_rank: int, *, pp: int, ep: int) -> str:
    name = f"mp_rank_{tp_rank:02d}"
    if pp > 1:
        name += f"_{pp_rank:03d}"
    if ep > 1:
        name += f"_{ep_rank:03d}"
    return name


def resolve_checkpoint_dir(path: Union[str, Path]) -> Path:
    """The directory holding the ``mp_rank_*`` folders.

    Accepts the checkpoint root (uses ``latest_checkpointed_iteration.txt`` if present, else
    ``release/``) or the ``release``/``iter_*`` directory itself.
    """
    p = Path(path)
    tracker = p / "latest_checkpointed_iteration.txt"
    if tracker.is_file():
        tag = tracker.read_text().strip()
        sub = p / ("release" if tag == "release" else f"iter_{int(tag):07d}")
        if sub.is_dir():
            return sub
    if (p / "release").is_dir():
        return p / "release"
    if any(p.glob("mp_rank_*")):
        return p
    raise FileNotFoundError(f"no megatron legacy checkpoint (mp_rank_* folders) under {p}")


def load_checkpoint_file(path: Union[str, Path]) -> dict:
    """``torch.load(weights_only=True)`` with argparse.Namespace allowed (and megatron-core's
    own safe globals as a fallback for files written by megatron training)."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # pragma: no cover - only for files with richer `args`
            try:
                from megatron.core.safe_globals import SAFE_GLOBALS
            except Exception:
                raise
            with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
                return torch.load(path, map_location="cpu", weights_only=True)


def load_rank_state_dict(path: Union[str, Path], tp_rank: int, pp_rank: int, ep_rank: int, *,
                         pp: int, ep: int) -> dict:
    f = resolve_checkpoint_dir(path) / rank_dir_name(tp_rank, pp_rank, ep_rank, pp=pp, ep=ep) / CKPT_BASENAME
    return load_checkpoint_file(f)["model"]


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
