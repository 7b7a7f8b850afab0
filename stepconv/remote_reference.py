"""``stepconv verify --trust-remote-code``: the HF side run by the checkpoint folder's own ``modeling_step3p5.py`` and
``configuration_step3p5.py`` (the files StepFun's HF repo ships), one decoder layer at a time.

The files are imported as transformers' ``trust_remote_code`` imports them (``get_class_from_dynamic_module`` on the
``auto_map`` of config.json), and the model is run piece by piece the way the file's own ``forward`` runs it:

* config: the file's config class, ``from_dict`` of the checkpoint's config (what ``from_pretrained`` does), eager
  attention;
* decoder layer i: the file's decoder-layer class (named by its base model's ``_no_split_modules``) built as
  ``cls(config, i)`` with its parameters on the meta device and its buffers real (its RoPE tables are computed at
  construction and are not in the checkpoint), then filled strictly with the checkpoint tensors under the file's own
  module path (``model.layers.{i}.``): no renaming, every name must match;
* RoPE: computed by each layer itself from ``position_ids`` ``[1, S]``, as the file's model makes them;
* masks: transformers' ``create_causal_mask`` / ``create_sliding_window_causal_mask`` on the file's config, as the
  file's model calls them, one per ``attention_type``;
* embedding, final norm, output layer: the modules of a zero-layer instance of the file's ``AutoModelForCausalLM``;
* MoE trace (router agreement, per-expert outputs): the file's MoE block's own ``custom_routing_function`` (its
  selection observed as it runs) and ``get_expert_output``.

What the file does not model is built around its pieces and reported (``description``): Step-3.5's MTP layers (the
file's loader ignores ``model.layers.45-47``). Each MTP block is the file's decoder layer at index ``L + k``; its
``enorm``/``hnorm``/``eh_proj``/``transformer.shared_head`` wiring is stepconv's (the same as the in-tree reference's),
with copies of the file's own final-norm and output-layer modules.

This module never imports ``transformers.models.step3p7``, so it runs on transformers 4.x, where StepFun's files run
(measured: docs/VERIFY.md). When the installed transformers cannot run the files, the failure is one line naming the
version, the step and the error.
"""

from __future__ import annotations

import copy
import inspect
import sys
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from .errors import StepconvError
from .hf_io import HFCheckpoint
from .reference import LayerTrace, mtp_step

__all__ = ["RemoteReference", "MEASURED_RUNS_ON"]

MEASURED_RUNS_ON = "4.57.1"  # the transformers release docs/VERIFY.md measured the public copy of the files on
_MTP_EXTRA = ("enorm.weight", "hnorm.weight", "eh_proj.weight", "transformer.shared_head.norm.weight",
              "transformer.shared_head.output.weight")


@contextmanager
def _parameters_on_meta():
    """Modules built inside get their parameters on the meta device (no memory, no random init) and keep real
    buffers: what transformers 4.x's ``init_empty_weights`` does, which 5.x no longer has."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _mask(fn, config, embeds: torch.Tensor, pos: torch.Tensor):
    """transformers' mask function `fn` called with what the installed release names its arguments."""
    params = inspect.signature(fn).parameters
    kw = {"config": config, "attention_mask": None, "position_ids": pos}
    kw["input_embeds" if "input_embeds" in params else "inputs_embeds"] = embeds
    if "cache_position" in params:
        kw["cache_position"] = torch.arange(embeds.shape[1], device=embeds.device)
    kw["past_key_values" if "past_key_values" in params else "cache"] = None
    return fn(**kw)


class RemoteReference:
    """The checkpoint's own modeling code as verify's HF side (same calls as ``hf_reference.StreamedReference``:
    ``start(ids)``, ``layer(i, h)``, ``final(h)``, ``mtp(k, h)``, ``mtp_logits(k, normed)``).

    Example: ``r = RemoteReference("ckpt"); h = r.start(ids); t = r.layer(0, h); logits = r.final(t.out)``.
    """

    def __init__(self, hf_dir: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        import transformers

        self.hf_dir = Path(hf_dir)
        self.version = transformers.__version__
        self.ckpt = HFCheckpoint(hf_dir)
        self.config = cfg = self.ckpt.config
        self.dtype, self.device = dtype, torch.device(device)
        auto = cfg.raw.get("auto_map") or {}
        refs = {k: auto.get(k) for k in ("AutoConfig", "AutoModelForCausalLM")}
        if not all(isinstance(v, str) and v.count(".") == 1 for v in refs.values()):
            raise StepconvError(f"{self.hf_dir}/config.json: --trust-remote-code needs auto_map to name AutoConfig and "
                                f"AutoModelForCausalLM as file.Class (e.g. modeling_step3p5.Step3p5ForCausalLM); "
                                f"it has {auto or 'no auto_map'}")
        self.model_file = refs["AutoModelForCausalLM"].split(".")[0] + ".py"
        self.files = sorted({v.split(".")[0] + ".py" for v in refs.values()})
        absent = [f for f in self.files if not (self.hf_dir / f).is_file()]
        if absent:
            raise StepconvError(f"{self.hf_dir}: --trust-remote-code runs the folder's own {', '.join(self.files)}; "
                                f"missing: {', '.join(absent)}")
        with self._running("importing it"):
            from transformers.dynamic_module_utils import get_class_from_dynamic_module

            config_cls = get_class_from_dynamic_module(refs["AutoConfig"], self.hf_dir)
            model_cls = get_class_from_dynamic_module(refs["AutoModelForCausalLM"], self.hf_dir)
        with self._running("building its config"):
            self.rc = config_cls.from_dict(dict(cfg.raw))
            self.rc._attn_implementation = "eager"  # the file's own eager_attention_forward
        with self._running("building its model without layers"):
            top_cfg = copy.deepcopy(self.rc)
            top_cfg.num_hidden_layers = 0
            with torch.device("meta"):
                top = model_cls(top_cfg)
        self._top, self._layers_path, self._layer_cls = self._take_apart(top, model_cls)
        self._check_names()
        self.description = (f"{self.hf_dir.name}/{self.model_file} ({self._layer_cls.__name__}) on transformers "
                            f"{self.version}" + (f"; MTP not modelled by the file: its decoder layer at index "
                                                 f"{cfg.num_layers}+k inside stepconv's enorm/hnorm/eh_proj/"
                                                 f"shared_head wiring" if cfg.num_mtp else ""))
        self._embeddings: torch.Tensor | None = None

    # ----------------------------------------------------------------------------------- the file's pieces

    @contextmanager
    def _running(self, what: str):
        try:
            yield
        except StepconvError:
            raise
        except Exception as e:  # the file failing on this transformers (or on these inputs): one line, no traceback
            msg = " ".join(str(e).split())[:300] or "no message"
            raise StepconvError(
                f"--trust-remote-code: {self.hf_dir.name}/{'/'.join(self.files)} cannot run on transformers "
                f"{self.version} ({what}: {type(e).__name__}: {msg}); the public copy measured in docs/VERIFY.md "
                f"runs on transformers {MEASURED_RUNS_ON}") from None

    def _take_apart(self, top: nn.Module, model_cls: type) -> tuple[dict, str, type]:
        """The zero-layer model's embedding, final norm and output layer; where its decoder layers live; their
        class."""
        owners = {n: m for n, m in top.named_modules() if any(True for _ in m.parameters(recurse=False))}
        embed = [n for n, m in owners.items() if isinstance(m, nn.Embedding)]
        head = [n for n, m in owners.items() if isinstance(m, nn.Linear)]
        norm = [n for n in owners if n not in embed + head]
        lists = [n for n, m in top.named_modules() if isinstance(m, nn.ModuleList)]
        split = sorted({n for m in top.modules() for n in (getattr(m, "_no_split_modules", None) or ())})
        module = sys.modules[model_cls.__module__]
        classes = [c for c in (getattr(module, n, None) for n in split) if isinstance(c, type)]
        if not (len(embed) == len(head) == len(norm) == len(lists) == len(classes) == 1):
            raise StepconvError(f"{self.hf_dir}/{self.model_file}: expected {model_cls.__name__} to hold one "
                                f"embedding, one final norm, one output Linear, one list of decoder layers and to name their "
                                f"class in _no_split_modules; found embeddings {embed}, Linears {head}, other "
                                f"parameter owners {norm}, layer lists {lists}, _no_split_modules {split}")
        return {"embed": (embed[0], owners[embed[0]]), "norm": (norm[0], owners[norm[0]]),
                "head": (head[0], owners[head[0]])}, lists[0], classes[0]

    def _build(self, i: int) -> nn.Module:
        """The file's decoder layer `i` (parameters on meta); MTP indices get stepconv's MTP wiring around it."""
        cfg = self.config
        with self._running(f"building decoder layer {i}"), _parameters_on_meta():
            layer = self._layer_cls(self.rc, i)
        if i >= cfg.num_layers:
            norm, head = self._top["norm"][1], self._top["head"][1]
            with torch.device("meta"):
                layer.enorm, layer.hnorm = copy.deepcopy(norm), copy.deepcopy(norm)
                layer.eh_proj = nn.Linear(2 * cfg.hidden, cfg.hidden, bias=False)
                layer.transformer = nn.Module()
                layer.transformer.shared_head = nn.Module()
                layer.transformer.shared_head.norm = copy.deepcopy(norm)
                layer.transformer.shared_head.output = copy.deepcopy(head)
        return layer

    def _prefix(self, i: int) -> str:
        return f"{self._layers_path}.{i}."

    def _check_names(self) -> None:
        """Strict, before anything runs: every parameter of every piece has a checkpoint tensor and every checkpoint
        tensor has a parameter."""
        cfg = self.config
        expected = {f"{path}.{n}" for path, mod in self._top.values() for n in mod.state_dict()}
        for i in range(cfg.num_layers + cfg.num_mtp):
            expected |= {self._prefix(i) + n for n in self._build(i).state_dict()}
        have = set(self.ckpt.tensors)
        missing, unexpected = sorted(expected - have), sorted(have - expected)
        if missing or unexpected:
            raise StepconvError(f"{self.hf_dir}: strict load of {'/'.join(self.files)} failed: parameters with no "
                                f"checkpoint tensor: {missing or 'none'}; checkpoint tensors with no parameter: "
                                f"{unexpected or 'none'}")

    def _fill(self, module: nn.Module, prefix: str) -> nn.Module:
        """Load exactly the checkpoint tensors under `prefix` into `module` (strict), in the run's dtype (as
        ``from_pretrained(dtype=...)`` casts them)."""
        sd = {n[len(prefix):]: self.ckpt.lazy(n)[:].to(self.dtype) for n in self.ckpt.tensors if n.startswith(prefix)}
        own = set(module.state_dict())
        if own != set(sd):
            raise StepconvError(f"{self.hf_dir}: strict load of {prefix}* failed: parameters with no checkpoint "
                                f"tensor: {sorted(own - set(sd)) or 'none'}; checkpoint tensors with no parameter: "
                                f"{sorted(prefix + n for n in set(sd) - own) or 'none'}")
        module.load_state_dict(sd, strict=True, assign=True)
        meta = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
        if meta:
            raise StepconvError(f"{self.hf_dir}: tensors of {prefix}* left uninitialised after loading: {meta}")
        return module.to(self.device).eval()

    def _top_module(self, key: str, prefix: str | None = None) -> nn.Module:
        path, meta_module = self._top[key]
        return self._fill(copy.deepcopy(meta_module), prefix or f"{path}.")

    def _masks(self, h: torch.Tensor, pos: torch.Tensor) -> dict:
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        with self._running("building its attention masks"):
            return {"full_attention": _mask(create_causal_mask, self.rc, h, pos),
                    "sliding_attention": _mask(create_sliding_window_causal_mask, self.rc, h, pos)}

    def _run(self, layer: nn.Module, i: int, h: torch.Tensor, masks: dict, pos: torch.Tensor) -> torch.Tensor:
        kind = getattr(layer, "attention_type", None) or self.rc.layer_types[i]
        with self._running(f"running decoder layer {i}"):
            out = layer(h, attention_mask=masks[kind], position_ids=pos)
        return out[0] if isinstance(out, (tuple, list)) else out

    # ----------------------------------------------------------------------------------- the reference protocol

    @torch.no_grad()
    def start(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Embed `input_ids` [B, S] with the file's embedding; positions [1, S] and masks as its model makes them."""
        embed = self._top_module("embed")
        ids = input_ids.long().to(self.device)
        h = embed(ids)
        del embed
        self._embeddings = h
        self._pos = torch.arange(ids.shape[1], device=self.device).unsqueeze(0)
        self._main_masks = self._masks(h, self._pos)
        return h

    @torch.no_grad()
    def layer(self, i: int, h: torch.Tensor) -> LayerTrace:
        """The file's decoder layer `i` on `h` [B, S, H], with what its sublayers saw (see reference.LayerTrace)."""
        layer = self._fill(self._build(i), self._prefix(i))
        post = getattr(layer, "post_attention_layernorm", None)
        if post is None:
            raise StepconvError(f"{self.hf_dir}/{self.model_file}: decoder layer {i} has no post_attention_layernorm; "
                                "verify reads the MLP's input there")
        seen: dict = {}
        hooks = [post.register_forward_hook(lambda _m, args, out: seen.update(mid=args[0], x=out))]
        moe = next((m for m in layer.modules() if hasattr(m, "get_expert_output")), None)
        if moe is None and self.config.is_moe(i):
            raise StepconvError(f"{self.hf_dir}/{self.model_file}: layer {i} is an MoE layer, but the file's layer has "
                                "no block with get_expert_output; verify runs each selected expert through it")
        if moe is not None:
            route = getattr(moe, "custom_routing_function", None)
            if not callable(route):
                raise StepconvError(f"{self.hf_dir}/{self.model_file}: layer {i}'s MoE block routes without "
                                    "custom_routing_function; verify observes the selection through it")

            def observe(logits, top_k, **kw):
                weights, idx = route(logits, top_k, **kw)
                seen["route"] = (weights, idx)
                return weights, idx

            moe.custom_routing_function = observe
        try:
            out = self._run(layer, i, h, self._main_masks, self._pos)
        finally:
            for hk in hooks:
                hk.remove()
        trace = LayerTrace(out=out, mid=seen["mid"])
        if moe is not None:
            weights, idx = seen["route"]
            idx = idx.long()
            x = seen["x"]
            flat = x.reshape(-1, x.shape[-1])
            slots = torch.zeros(idx.shape[1], flat.shape[0], flat.shape[1], device=flat.device)
            with self._running(f"running the experts of layer {i}"):
                for e in idx.unique().tolist():
                    t, j = (idx == e).nonzero(as_tuple=True)  # tokens t whose selection j is expert e
                    slots[j, t] = moe.get_expert_output(flat[t], e).float()
            trace = LayerTrace(out=out, mid=seen["mid"], x=x, idx=idx, weights=weights, slots=slots)
        del layer
        return trace

    @torch.no_grad()
    def final(self, h: torch.Tensor) -> torch.Tensor:
        """The file's final norm and output layer on the last layer's output: logits [B, S, V] (fp32)."""
        norm, head = self._top_module("norm"), self._top_module("head")
        return head(norm(h)).float()

    @torch.no_grad()
    def mtp(self, k: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """MTP layer k (the file's decoder layer at L + k in stepconv's MTP wiring) on `h`; its block output
        [B, S-k-1, H] and its own head's logits (fp32)."""
        i = self.config.num_layers + k
        layer = self._fill(self._build(i), self._prefix(i))

        def block(z, n):
            pos = self._pos[:, :n]
            return self._run(layer, i, z, self._masks(z, pos), pos)

        return mtp_step(layer, self._embeddings, h, k, block)

    @torch.no_grad()
    def mtp_logits(self, k: int, normed: torch.Tensor) -> torch.Tensor:
        """MTP layer k's own output layer (shared_head.output only) on an already normalised block output."""
        head = self._top_module("head", f"{self._prefix(self.config.num_layers + k)}transformer.shared_head.output.")
        return head(normed.to(self.device, self.dtype)).float()
