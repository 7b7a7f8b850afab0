"""Test data for `stepconv verify --trust-remote-code` (tests/test_remote_code.py copies it into a checkpoint folder):
a remote-code config in the shape of StepFun's, written by stepconv from the Step-3.5 spec, not StepFun's file."""

from transformers import PretrainedConfig


class Step3p5Config(PretrainedConfig):
    model_type = "step3p5"

    def __init__(self, **kwargs):
        # Step-3.5 lists per-layer facts over main + MTP layers (5 entries for 4 layers here). transformers 5.x checks
        # that `layer_types` has exactly num_hidden_layers entries and standardises `rope_theta`/`rope_scaling` into
        # one set of RoPE parameters per layer type, so these are kept under names of their own.
        for key in ("layer_types", "rope_theta", "rope_scaling"):
            setattr(self, f"step_{key}", kwargs.pop(key, None))
        self.max_position_embeddings = kwargs.pop("max_position_embeddings", None)
        self.rms_norm_eps = kwargs.pop("rms_norm_eps", 1e-5)  # StepFun's default
        super().__init__(**kwargs)
