"""transformers wrapper of an rmoe model exported with custom code (written by ``rmoe export``).

Load with ``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)``. The model itself
is rmoe's ``MoeLM``: the ``rmoe_*.py`` files next to this one are copies of rmoe's source (only
the import lines rewritten to relative ones), so loading needs torch and transformers, not rmoe.
``generate`` works through transformers' own loop: our attention appends to transformers'
``DynamicCache`` through the same ``update(key, value, layer_idx)`` call as its native models.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_rmoe import RmoeConfig
from .rmoe_model_config import ModelConfig
from .rmoe_model_decoder import MoeLM


class RmoeForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = RmoeConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _tied_weights_keys: ClassVar[dict[str, str]] = {"model.lm_head.weight": "model.embed_tokens.weight"}
    _no_split_modules: ClassVar[list[str]] = ["DecoderLayer"]

    def __init__(self, config: RmoeConfig) -> None:
        super().__init__(config)
        self.model = MoeLM(ModelConfig(**config.rmoe["arch"]))
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        """MoeLM initialises itself (rmoe's init); the exported weights replace it."""

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> RmoeForCausalLM:
        model = super().from_pretrained(*args, **kwargs)
        model.restore_computed_buffers()
        return model

    @torch.no_grad()
    def restore_computed_buffers(self) -> None:
        """Recompute the non-persistent buffers (e.g. LocMoE's fixed expert keys): they are not in the
        weights file, and transformers builds the model on the meta device, leaving them uninitialised."""
        saved = set(self.model.state_dict())
        computed = {name for name, _ in self.model.named_buffers() if name not in saved}
        if computed:
            fresh = dict(MoeLM(self.model.config).named_buffers())
            for name, buffer in self.model.named_buffers():
                if name in computed:
                    buffer.copy_(fresh[name])

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.model.lm_head

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Any = None,
        past_key_values: Any = None,
        use_cache: bool | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int = 0,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        cache = cache if cache is not None else past_key_values
        if cache is None and (use_cache if use_cache is not None else not self.training):
            cache = DynamicCache(config=self.config)
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError("RmoeForCausalLM takes a 2-D (batch, positions) attention_mask")
        out = self.model(input_ids, attention_mask_BK=attention_mask, cache=cache, position_ids_BS=position_ids)
        logits = out.logits if not logits_to_keep else out.logits[:, -logits_to_keep:]
        loss = None
        if labels is not None:
            loss = F.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache)
