"""The Megatron-LM entry's pieces that run without megatron.training: where the Step-3.5 config comes from, and
the MTP block rename that lets a checkpoint written for one megatron-core naming load into the other."""

import argparse
import json

import pytest

from conftest import FIXTURE
from stepconv.config import StepconvError
from stepconv.convert import hf_to_mcore
from stepconv.megatron_lm import add_step35_args, step35_config
from stepconv.mcore.model import _mtp_names_as_installed, mtp_inner_layer_name


def _args(**kw) -> argparse.Namespace:
    ns = add_step35_args(argparse.ArgumentParser()).parse_args([])
    for k, v in kw.items():
        setattr(ns, k, v)
    return ns


@pytest.mark.parametrize("fmt", ["torch", "torch_dist"])
def test_config_from_the_checkpoint_at_load_is_recorded_on_args(tmp_path, fmt):
    out = tmp_path / "mcore"
    hf_to_mcore(FIXTURE, out, tp=2, spec="local", format=fmt, window_convention="megatron")
    args = _args(load=str(out))
    cfg = step35_config(args)
    want = json.loads((FIXTURE / "config.json").read_text())
    assert cfg.raw == want and args.step35_config == want  # saved with every Megatron-LM checkpoint
    assert args.step35_window_convention == "megatron"
    assert step35_config(args).raw == want  # later calls read args, not the folder


def test_config_from_hf_config_flag_and_missing_config_is_refused(tmp_path):
    assert step35_config(_args(step35_hf_config=str(FIXTURE / "config.json"), load=None)).num_layers == 4
    with pytest.raises(StepconvError, match="--step35-hf-config"):
        step35_config(_args(load=None))


def test_mtp_block_of_the_other_megatron_naming_is_renamed_on_load():
    mine = mtp_inner_layer_name()
    other = "mtp_model_layer" if mine == "transformer_layer" else "transformer_layer"
    sd = {f"mtp.layers.0.{other}.input_layernorm.weight": 1, "mtp.layers.0.enorm.weight": 2,
          f"decoder.layers.0.{other}.x": 3}
    _mtp_names_as_installed(None, sd, "")
    assert sd == {f"mtp.layers.0.{mine}.input_layernorm.weight": 1, "mtp.layers.0.enorm.weight": 2,
                  f"decoder.layers.0.{other}.x": 3}
