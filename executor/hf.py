"""transformers loads a bitplan checkpoint as it is: `quant_method: "bitplan"` registered with its public
quantizer API (`register_quantization_config`, `register_quantizer`).

    import bitplan.executor.hf  # registers the method; nothing else to call
    model = AutoModelForCausalLM.from_pretrained("./smollm2-57MiB", dtype=torch.bfloat16, device_map="cuda")

`from_pretrained` builds the skeleton on the meta device; the quantizer un-fuses MoE experts (the names
`apply` writes) and swaps in the `QuantLinear`s of `quantization_config["modules"]` before the weights
load (`executor.load.swap_quantized`, the same swap as `load_quantized`), and the checkpoint's tensors
load into them by name, as written: the model's own conversions (merging per-expert weights into fused
ones) are turned off.  After loading, the experts are fused into `QuantExpertLinears` (one launch per
projection on CUDA).  Scales stay fp16 whatever `dtype` (the module declares them so, and transformers
keeps a parameter's declared dtype); everything else follows `dtype` as it would for any model.

Only checkpoints of this bitplan's format load: another `format` fails with a message naming it.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from bitplan.db.types import InvalidInput, Option
from bitplan.executor.apply import CHECKPOINT_FORMAT, QUANT_METHOD


@register_quantization_config(QUANT_METHOD)
class BitplanConfig(QuantizationConfigMixin):
    """`config.json`'s `quantization_config` as `apply` writes it (`executor.apply.quantization_config`)."""

    def __init__(self, modules: dict[str, dict], format: str = CHECKPOINT_FORMAT, plan_id: str | None = None,
                 quantizer: str = "rtn", quantizer_settings: dict | None = None, storage_dtype: str = "bfloat16",
                 gptq_inputs: str | None = None, **kwargs: Any):
        self.quant_method = QUANT_METHOD
        self.format = format
        self.modules = dict(modules)
        self.plan_id = plan_id
        self.quantizer = quantizer
        self.quantizer_settings = dict(quantizer_settings or {})
        self.storage_dtype = storage_dtype
        if gptq_inputs is not None:  # GPTQ checkpoints only: kept so that save_pretrained writes what it read
            self.gptq_inputs = gptq_inputs
        if format != CHECKPOINT_FORMAT:
            raise InvalidInput(f"this checkpoint is in bitplan's format {format!r}; this bitplan reads "
                               f"{CHECKPOINT_FORMAT!r}: write it again with `bitplan apply` of this version, or load "
                               f"it with the bitplan version that wrote it")


@register_quantizer(QUANT_METHOD)
class BitplanHfQuantizer(HfQuantizer):
    """Loads a checkpoint `bitplan apply` wrote; it does not quantize (plans are applied by `bitplan`)."""

    requires_calibration = True
    quantization_config: BitplanConfig

    def _process_model_before_weight_loading(self, model, **kwargs):
        from bitplan.executor.load import swap_quantized
        from bitplan.profiler.moe import unfuse_experts

        dtype = kwargs.get("dtype") or model.dtype
        unfuse_experts(model)
        modules = self.quantization_config.modules
        # on the meta device nothing is tied yet: the model's tie map says whether the head is the embedding's
        emb, head = model.get_input_embeddings(), model.get_output_embeddings()
        names = {m: n for n, m in model.named_modules()}
        tied = {f"{names[head]}.weight", f"{names[emb]}.weight"} if head is not None else set()
        pairs = [k for k, v in model.all_tied_weights_keys.items() if {k, v} == tied]
        quantized_pair = pairs and Option(**modules.get(names[emb], {"bits": 16})).quantized
        swap_quantized(model, modules, dtype, device="meta", head=head if quantized_pair else None)
        for k in pairs if quantized_pair else ():
            # the QuantTiedHead reads the embedding's codes: no weight of either is left to tie
            model.all_tied_weights_keys.pop(k)

    def update_weight_conversions(self, weight_conversions, model):
        # the checkpoint holds the un-fused, swapped modules' own names: nothing to rename or merge
        return []

    def _process_model_after_weight_loading(self, model, **kwargs):
        from bitplan.executor.quant_linear import fuse_quantized_experts

        fuse_quantized_experts(model)
        return model

    def update_dtype(self, dtype: torch.dtype | None) -> torch.dtype:
        return dtype or torch.float32

    def is_serializable(self) -> bool:
        return False  # `bitplan apply` writes these checkpoints

    @property
    def is_trainable(self) -> bool:
        return False
