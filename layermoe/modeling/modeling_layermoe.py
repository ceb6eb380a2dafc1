"""Layer-wise mixture of experts on top of any dense HF causal LM (Llama, Qwen2/3, Mistral, Gemma/2).

The base family's CausalLM is built as is; only the `mlp` of the layers that received new
experts is swapped for a `LayermoeMoeBlock`. Attention, norms, embeddings, rotary and the
KV cache stay the family's own code, so an upcycled model computes what the base computed.

Self-contained on purpose (imports only torch, transformers and the sibling config and compat
files): the three are copied into every checkpoint so it loads with `trust_remote_code=True`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel

from .compat import (
    CausalLMOutputBase,
    cache_keyword,
    output_cache,
    pop_cache_argument,
    requested_attn_implementation,
    take_experts_implementation,
)
from .compat import grouped_mm as _grouped_mm
from .configuration_layermoe import MOE_KERNELS, TRANSFORMERS_EXPERTS_TO_MOE_KERNEL, LayermoeConfig


# ----------------------------------------------------------------------------------------
# Routing
# ----------------------------------------------------------------------------------------
def route_top_k(router_logits: torch.Tensor, top_k: int, allowed: torch.Tensor | None = None):
    """Softmax over the experts in fp32, keep the top-k, renormalise the k weights (Sec. 3).

    router_logits: [R, E]; allowed: optional [R, E] bool, experts a token may use (the
    top-k is clipped to each token's allowed count). Returns (weights [R, k], experts [R, k],
    valid [R, k] bool) with k = min(top_k, E); invalid slots have weight 0.
    """
    k = min(top_k, router_logits.shape[-1])
    logits = router_logits.float()
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    probs = logits.softmax(dim=-1)  # [R, E]
    weights, experts = probs.topk(k, dim=-1)  # [R, k]
    if allowed is None:
        valid = torch.ones_like(weights, dtype=torch.bool)
    else:
        k_per_token = allowed.sum(-1, keepdim=True).clamp(max=k)  # [R, 1]
        valid = torch.arange(k, device=logits.device) < k_per_token  # [R, k]
        weights = weights * valid
    weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, experts, valid


def allowed_experts_per_class(generation_ids: list[int], num_classes: int, device=None) -> torch.Tensor:
    """[C, E] bool: which experts a token of classifier class c may be routed to.

    Binary classifier (C = 2): class 1 ("new") may use every expert. With one class per
    generation (C > 2): class c may use experts of generations <= c. Class 0 never reaches
    the router (it goes to expert 0 alone), its row is expert 0 only for completeness.
    """
    gens = torch.tensor(generation_ids, device=device)  # [E]
    classes = torch.arange(num_classes, device=device)[:, None]  # [C, 1]
    if num_classes == 2:
        allowed = (classes > 0) | (gens[None, :] == 0)
    else:
        allowed = gens[None, :] <= classes
    return allowed  # [C, E]


# ----------------------------------------------------------------------------------------
# Experts
# ----------------------------------------------------------------------------------------
class LayermoeExpertGroup(nn.Module):
    """The new experts one generation added to one layer, stacked in their own tensors.

    Separate tensors per generation make freezing a generation a plain `requires_grad_`.
    gate_up_proj: [E_g, 2I, H] (gate rows first, then up rows); down_proj: [E_g, H, I].
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, dtype=None, device=None):
        super().__init__()
        self.num_experts = num_experts
        self.gate_up_proj = nn.Parameter(torch.zeros(num_experts, 2 * intermediate_size, hidden_size, dtype=dtype, device=device))
        self.down_proj = nn.Parameter(torch.zeros(num_experts, hidden_size, intermediate_size, dtype=dtype, device=device))

    @torch.no_grad()
    def copy_from_mlp(self, mlp: nn.Module) -> None:
        """Make every expert of the group an exact copy of a gate/up/down MLP (upcycling)."""
        gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight], dim=0)  # [2I, H]
        self.gate_up_proj.copy_(gate_up.expand_as(self.gate_up_proj))
        self.down_proj.copy_(mlp.down_proj.weight.expand_as(self.down_proj))

    @torch.no_grad()
    def copy_from_expert(self, group: "LayermoeExpertGroup", index: int) -> None:
        """Make every expert of the group an exact copy of expert `index` of another group."""
        self.gate_up_proj.copy_(group.gate_up_proj[index : index + 1].expand_as(self.gate_up_proj))
        self.down_proj.copy_(group.down_proj[index : index + 1].expand_as(self.down_proj))

    def extra_repr(self) -> str:
        e, two_i, h = self.gate_up_proj.shape
        return f"experts={e}, hidden={h}, intermediate={two_i // 2}"


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls on `x` run in: autocast's where it is on for x's device, else x's own.

    Training keeps fp32 master weights and autocasts, so the MoE input arrives in fp32 while
    the matmuls are meant to run in bf16; `_grouped_mm` has no autocast rule of its own.
    """
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def grouped_mm_usable(x: torch.Tensor, group: LayermoeExpertGroup) -> bool:
    """grouped_mm needs 16-byte aligned rows (in the dtype it runs in); on CUDA also SM80+."""
    if _grouped_mm is None:
        return False
    size = torch.empty((), dtype=compute_dtype(x)).element_size()
    _, two_i, h = group.gate_up_proj.shape
    if (h * size) % 16 or (two_i // 2 * size) % 16:
        return False
    if x.device.type == "cuda":
        return torch.cuda.get_device_capability(x.device) >= (8, 0)
    return True


def experts_grouped(group, act_fn, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """All experts of a group in two grouped GEMMs. x_sorted: [P, H] sorted by expert; counts: [E_g].

    Runs in the compute dtype (bf16 under bf16 autocast): autocast does not cover
    `_grouped_mm`, and in fp32 it would fall back to a slow per-group path on CUDA.
    """
    dtype = compute_dtype(x_sorted)
    offs = counts.cumsum(0).to(torch.int32)  # [E_g], end of each expert's rows
    gate_up_proj = group.gate_up_proj.to(dtype).transpose(1, 2)  # [E_g, H, 2I]
    down_proj = group.down_proj.to(dtype).transpose(1, 2)  # [E_g, I, H]
    gate_up = _grouped_mm(x_sorted.to(dtype), gate_up_proj, offs=offs)  # [P, 2I]
    gate, up = gate_up.chunk(2, dim=-1)
    return _grouped_mm((act_fn(gate) * up).to(dtype), down_proj, offs=offs)  # [P, H]


def experts_loop(group, act_fn, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Same as `experts_grouped`, one expert at a time (exact reference, any device/shape)."""
    outputs = []
    start = 0
    for e, n in enumerate(counts.tolist()):
        if n == 0:
            continue
        xe = x_sorted[start : start + n]  # [n, H]
        gate, up = F.linear(xe, group.gate_up_proj[e]).chunk(2, dim=-1)  # [n, I] each
        outputs.append(F.linear(act_fn(gate) * up, group.down_proj[e]))  # [n, H]
        start += n
    return torch.cat(outputs, dim=0)


# ----------------------------------------------------------------------------------------
# Sequence-level classifier input: a causal running mean within the document
# ----------------------------------------------------------------------------------------
def causal_segment_mean(hidden: torch.Tensor, keep: torch.Tensor, starts: torch.Tensor, carry=None):
    """The classifier input of `classifier_granularity="sequence"`: at every position, the mean of the
    non-padding hidden states from the start of its document up to and including itself.

    The authors' code pools the whole sequence (padding included), so a token's routing, hence
    its logits, depended on later tokens, and a packed training block mixed documents of
    different languages. Pooling causally and restarting at each document start makes a full
    forward, a packed training block and KV-cached decoding compute the same thing.

    hidden: [B, S, H]; keep: [B, S] bool, False on padding; starts: [B, S] bool, True where a
    document starts (the pool restarts there); carry: (sum [B, H], count [B]) of the tokens
    before this call (cached decoding), or None. Returns (mean [B, S, H] in hidden's dtype,
    (sum [B, H], count [B]) at the last position, the carry of the next call).
    """
    acc = torch.float32 if hidden.device.type == "mps" else torch.float64  # no drift between cached and full
    b, s, h = hidden.shape
    x = hidden.to(acc) * keep.unsqueeze(-1)  # [B, S, H]
    zeros = x.new_zeros(b, 1, h)
    prefix = torch.cat([zeros, x.cumsum(1)], 1)  # [B, S+1, H]: prefix[:, t] = sum of positions < t
    counts = torch.cat([x.new_zeros(b, 1), keep.to(acc).cumsum(1)], 1)  # [B, S+1]
    positions = torch.arange(s, device=hidden.device).expand(b, s)
    last_start = torch.where(starts, positions, -1).cummax(1).values  # [B, S], -1: no start yet in this call
    base = last_start.clamp(min=0)
    total = prefix[:, 1:] - prefix.gather(1, base.unsqueeze(-1).expand(b, s, h))  # [B, S, H]
    count = counts[:, 1:] - counts.gather(1, base)  # [B, S]
    if carry is not None:  # positions before any start continue the document of the previous call
        continued = (last_start < 0).to(acc)
        total = total + continued.unsqueeze(-1) * carry[0].to(acc).unsqueeze(1)
        count = count + continued * carry[1].to(acc).unsqueeze(1)
    mean = total / count.clamp(min=1).unsqueeze(-1)
    return mean.to(hidden.dtype), (total[:, -1], count[:, -1])


class _PoolState:
    """What sequence-level classifiers carry from one cached-decoding call to the next (kept on the KV cache)."""

    def __init__(self, last_token_ends_document: torch.Tensor, carries: dict):
        self.last_token_ends_document = last_token_ends_document  # [B] bool
        self.carries = carries  # layer -> (sum [B, H], count [B])

    def reorder(self, beam_idx: torch.Tensor) -> None:
        self.last_token_ends_document = self.last_token_ends_document[beam_idx.to(self.last_token_ends_document.device)]
        self.carries = {i: (total[beam_idx.to(total.device)], count[beam_idx.to(count.device)])
                        for i, (total, count) in self.carries.items()}


class LayermoeMoeBlock(nn.Module):
    """Replaces one decoder layer's `mlp`: expert 0 (the base MLP) + one group of experts per generation.

    Router: Linear(H -> E, bias=False), columns ordered expert 0, G1's experts, G2's, ...
    Optional routing classifier (Eq. 11-13): Linear(H -> C, bias=False); a token of class 0
    goes to expert 0 alone with weight 1 and costs nothing else.
    """

    def __init__(
        self,
        expert0: nn.Module,
        new_experts: list[int],
        top_k: int = 2,
        classifier_classes: int = 0,
        classifier_granularity: str = "token",
        classifier_routing: bool = True,
        moe_kernel: str = "auto",
    ):
        super().__init__()
        weight = expert0.gate_proj.weight  # [I, H]
        intermediate_size, hidden_size = weight.shape
        self.expert0 = expert0
        self.experts = nn.ModuleDict(
            {
                f"g{g}": LayermoeExpertGroup(n, hidden_size, intermediate_size, dtype=weight.dtype, device=weight.device)
                for g, n in enumerate(new_experts, start=1)
                if n > 0
            }
        )
        self.new_experts = list(new_experts)
        self.num_experts = 1 + sum(new_experts)
        self.router = nn.Linear(hidden_size, self.num_experts, bias=False, dtype=weight.dtype, device=weight.device)
        self.classifier = None
        if classifier_classes:
            self.classifier = nn.Linear(hidden_size, classifier_classes, bias=False, dtype=weight.dtype, device=weight.device)
        self.top_k = top_k
        self.classifier_granularity = classifier_granularity
        self.classifier_routing = classifier_routing
        self.moe_kernel = moe_kernel
        # Set by LayermoeForCausalLM around each forward.
        self.attention_mask: torch.Tensor | None = None
        self.document_starts: torch.Tensor | None = None  # [B, S] bool (sequence granularity)
        self.pool_carry = None  # (sum, count) from the previous cached call
        self.pool_out = None  # (sum, count) after this call
        self.record_logits = False
        self.last_router_logits: torch.Tensor | None = None
        self.last_classifier_logits: torch.Tensor | None = None

    @property
    def generation_ids(self) -> list[int]:
        ids = [0]
        for g, n in enumerate(self.new_experts, start=1):
            ids += [g] * n
        return ids

    def expert_ranges(self):
        """(name, group, first router column, last+1) of each generation group."""
        start = 1
        for g, n in enumerate(self.new_experts, start=1):
            if n > 0:
                yield f"g{g}", self.experts[f"g{g}"], start, start + n
            start += n

    def _use_grouped(self, x: torch.Tensor) -> bool:
        if self.moe_kernel == "loop":
            return False
        if self.moe_kernel == "grouped":
            return True
        return x.is_cuda

    def classifier_input(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[B, S, H] -> [B*S, H]: each token itself ("token"), or ("sequence") the causal running mean of
        its document's non-padding tokens so far (`causal_segment_mean`)."""
        b, s, h = hidden_states.shape
        if self.classifier_granularity == "token":
            return hidden_states.reshape(-1, h)
        mask = self.attention_mask
        if mask is not None and mask.dim() == 2:
            keep = mask[:, -s:].bool()  # [B, S]; with a KV cache the mask also covers the past
        else:
            keep = torch.ones(b, s, dtype=torch.bool, device=hidden_states.device)
        starts = self.document_starts
        if starts is None:  # called on its own: the call is one fresh document per row
            starts = torch.zeros(b, s, dtype=torch.bool, device=hidden_states.device)
            starts[:, 0] = self.pool_carry is None
        pooled, self.pool_out = causal_segment_mean(hidden_states, keep, starts, self.pool_carry)
        return pooled.reshape(-1, h)

    def dispatch_plan(self, router_logits: torch.Tensor, token_class: torch.Tensor | None):
        """Which (token, expert, weight) pairs to compute. Returns three [P] tensors."""
        t = router_logits.shape[0]
        device = router_logits.device
        if token_class is None:
            routed = torch.arange(t, device=device)
            allowed = None
        else:
            old = token_class == 0
            routed = (~old).nonzero().squeeze(1)  # [R]
            allowed = None
            if self.classifier.out_features > 2:
                table = allowed_experts_per_class(self.generation_ids, self.classifier.out_features, device)
                allowed = table[token_class[routed]]  # [R, E]
        weights, experts, valid = route_top_k(router_logits[routed], self.top_k, allowed)  # [R, k] each
        k = weights.shape[1]
        token_idx = routed.unsqueeze(1).expand(-1, k)[valid]
        expert_idx = experts[valid]
        weight = weights[valid]
        if token_class is not None:
            old_idx = old.nonzero().squeeze(1)
            token_idx = torch.cat([old_idx, token_idx])
            expert_idx = torch.cat([torch.zeros_like(old_idx), expert_idx])
            weight = torch.cat([torch.ones(old_idx.shape, device=device), weight])
        return token_idx, expert_idx, weight

    def run_experts(self, x: torch.Tensor, token_idx, expert_idx, weight) -> torch.Tensor:
        """Compute the planned pairs and sum them per token with their weights. x: [T, H] -> [T, H]."""
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)  # fp32 accumulation
        act_fn = self.expert0.act_fn
        pick = expert_idx == 0
        tok = token_idx[pick]
        if tok.numel():
            y = self.expert0(x[tok])  # [n0, H]
            out.index_add_(0, tok, y.float() * weight[pick].unsqueeze(1))
        for _, group, lo, hi in self.expert_ranges():
            pick = (expert_idx >= lo) & (expert_idx < hi)
            local = expert_idx[pick] - lo
            if local.numel() == 0:
                continue
            local, order = local.sort(stable=True)
            tok = token_idx[pick][order]
            w = weight[pick][order]
            counts = torch.bincount(local, minlength=group.num_experts)  # [E_g]
            x_sorted = x[tok]  # [P, H]
            if self._use_grouped(x) and grouped_mm_usable(x, group):
                y = experts_grouped(group, act_fn, x_sorted, counts)
            else:
                y = experts_loop(group, act_fn, x_sorted, counts)
            out.index_add_(0, tok, y.float() * w.unsqueeze(1))
        return out.to(x.dtype)

    def route(self, hidden_states: torch.Tensor):
        """The effective routing of hidden_states [B, S, H] (classifier applied).

        Returns (token_idx, expert_idx, weight) [P] each (tokens in row-major order of [B, S]),
        router logits [T, E] fp32 and classifier logits [T, C] or None.
        """
        h = hidden_states.shape[-1]
        x = hidden_states.reshape(-1, h)  # [T, H]
        # Routing decisions in fp32 whatever the autocast state (Sec. 3): in bf16 the top-k set
        # flips on a fraction of a percent of tokens.
        with torch.autocast(device_type=x.device.type, enabled=False):
            router_logits = F.linear(x.float(), self.router.weight.float())  # [T, E]
            classifier_logits = None
            if self.classifier is not None:
                cls_in = self.classifier_input(hidden_states)  # [T, H]
                classifier_logits = F.linear(cls_in.float(), self.classifier.weight.float())  # [T, C]
        token_class = None
        if classifier_logits is not None and self.classifier_routing:
            token_class = classifier_logits.detach().argmax(-1)  # [T]
        return self.dispatch_plan(router_logits, token_class), router_logits, classifier_logits

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        b, s, h = hidden_states.shape
        plan, router_logits, classifier_logits = self.route(hidden_states)
        if self.record_logits:
            self.last_router_logits = router_logits
            self.last_classifier_logits = classifier_logits
        return self.run_experts(hidden_states.reshape(-1, h), *plan).reshape(b, s, h)


# ----------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------
@dataclass
class LayermoeCausalLMOutput(CausalLMOutputBase):
    """The family's CausalLM output (loss, logits, the KV cache, hidden states, attentions) plus, on
    request, per-MoE-layer router and classifier logits. The cache field is transformers' own
    (`past_key_values` up to 5.23, `cache` from 5.24 on): read it with `compat.output_cache`.

    router_logits[i]: [T, E_i] fp32 pre-softmax; classifier_logits[i]: [T, C];
    T = batch * seq in row-major order of input_ids, padding included.
    """

    router_logits: dict | None = None
    classifier_logits: dict | None = None


_OUTPUT_FIELDS = {f.name for f in fields(CausalLMOutputBase)}


def decoder_layers(causal_lm: nn.Module) -> nn.ModuleList:
    inner = getattr(causal_lm, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ValueError(f"{type(causal_lm).__name__} has no .model.layers; only decoder-only LMs are supported")
    return layers


def _build_base_lm(config: LayermoeConfig) -> PreTrainedModel:
    """The base family's CausalLM, in the current default dtype, with the requested attention if it has it."""
    kwargs = {"dtype": torch.get_default_dtype()}
    attn_implementation = requested_attn_implementation(config)
    if attn_implementation is not None:
        try:
            return AutoModelForCausalLM.from_config(
                config.base_pretrained_config(), attn_implementation=attn_implementation, **kwargs
            )
        except (ValueError, ImportError):
            pass  # e.g. sdpa asked for at the top level but the family lacks it: let the family choose
    return AutoModelForCausalLM.from_config(config.base_pretrained_config(), **kwargs)


class LayermoePreTrainedModel(PreTrainedModel):
    config_class = LayermoeConfig
    base_model_prefix = "lm"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def _init_weights(self, module):
        std = getattr(self.config, "initializer_range", 0.02)
        if isinstance(module, LayermoeExpertGroup):
            nn.init.normal_(module.gate_up_proj, std=std)
            nn.init.normal_(module.down_proj, std=std)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)


class LayermoeForCausalLM(LayermoePreTrainedModel, GenerationMixin):
    def __init__(self, config: LayermoeConfig, lm: PreTrainedModel | None = None):
        # `from_pretrained(..., experts_implementation=X)` (transformers' option) picks our kernel;
        # read it before PreTrainedModel.__init__ fills in transformers' own default.
        kernel = take_experts_implementation(config, TRANSFORMERS_EXPERTS_TO_MOE_KERNEL)
        if kernel is not None:
            config.moe_kernel = kernel
        super().__init__(config)
        if lm is None:
            lm = _build_base_lm(config)
        self.lm = lm
        layers = decoder_layers(lm)
        classes = config.classifier_classes if config.classifier_layers else 0
        for i in config.moe_layers:
            layers[i].mlp = LayermoeMoeBlock(
                layers[i].mlp,
                config.new_experts[i],
                top_k=config.num_experts_per_tok,
                classifier_classes=classes if i in config.classifier_layers else 0,
                classifier_granularity=config.classifier_granularity,
                classifier_routing=config.classifier_routing,
                moe_kernel=config.moe_kernel,
            )
        self.post_init()

    # -- helpers -------------------------------------------------------------------------
    def moe_blocks(self) -> dict[int, LayermoeMoeBlock]:
        """Layer index -> MoE block, for the MoE layers only."""
        return {i: layer.mlp for i, layer in enumerate(decoder_layers(self.lm)) if isinstance(layer.mlp, LayermoeMoeBlock)}

    def expert_generation_ids(self, layer: int) -> list[int]:
        """Generation of each router column of `layer`, e.g. [0, 1, 1, 1, 2, 2]."""
        return self.config.expert_generation_ids(layer)

    def set_moe_kernel(self, name: str) -> None:
        """Switch all MoE blocks between "auto", "grouped" and "loop" (same outputs, different speed)."""
        if name not in MOE_KERNELS:
            raise ValueError(f"moe kernel {name!r}; use {', '.join(MOE_KERNELS)}")
        self.config.moe_kernel = name
        for block in self.moe_blocks().values():
            block.moe_kernel = name

    def set_classifier_routing(self, enabled: bool) -> None:
        """Let the routing classifier decide routing (True) or only produce logits (False, e.g. stage 1)."""
        self.config.classifier_routing = bool(enabled)
        for block in self.moe_blocks().values():
            block.classifier_routing = bool(enabled)

    def get_input_embeddings(self):
        return self.lm.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.lm.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.lm.get_output_embeddings()

    def set_output_embeddings(self, value):
        self.lm.set_output_embeddings(value)

    # -- sequence-level classifiers: document boundaries and the state a KV cache carries -------
    def _document_ends(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, S] bool: the token ends a document (an EOS). Packed training blocks separate documents with EOS."""
        eos = self.config.eos_token_id
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        if not eos:
            return torch.zeros_like(input_ids, dtype=torch.bool)
        return torch.isin(input_ids, torch.tensor(eos, device=input_ids.device))

    def _prepare_pooling(self, blocks, input_ids, inputs_embeds, past_key_values):
        """Set each sequence-level block's document starts and carry; return the state read from the cache."""
        pooling = {i: b for i, b in blocks.items() if b.classifier is not None and b.classifier_granularity == "sequence"}
        if not pooling:
            return pooling, None
        fresh = past_key_values is None or past_key_values.get_seq_length() == 0
        state = None if fresh else getattr(past_key_values, "layermoe_pool", None)
        if not fresh and state is None:
            raise ValueError("this KV cache was not filled by LayermoeForCausalLM.forward, so the sequence-level "
                             "classifiers have no running mean to continue: start from an empty cache")
        reference = input_ids if input_ids is not None else inputs_embeds[..., 0]
        b, s = reference.shape
        starts = torch.zeros(b, s, dtype=torch.bool, device=reference.device)  # [B, S]
        starts[:, 0] = True if state is None else state.last_token_ends_document.to(reference.device)
        if input_ids is not None and s > 1:
            starts[:, 1:] = self._document_ends(input_ids[:, :-1])  # a document starts right after an EOS
        for i, block in pooling.items():
            block.document_starts = starts
            block.pool_carry = None if state is None else state.carries.get(i)
        return pooling, starts

    def _reorder_cache(self, past_key_values, beam_idx):
        """Beam search: reorder the KV cache and, with it, the sequence-level classifiers' running means."""
        past_key_values.reorder_cache(beam_idx)
        state = getattr(past_key_values, "layermoe_pool", None)
        if state is not None:
            state.reorder(beam_idx)
        return past_key_values

    # -- forward -------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        past_key_values=None,
        output_router_logits: bool = False,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> LayermoeCausalLMOutput:
        # use_cache and logits_to_keep are named (not left in **kwargs) so that callers that look at
        # the signature, e.g. the profile, can ask for no KV cache and the logits of one position.
        kwargs.pop("return_dict", None)
        past_key_values = pop_cache_argument(kwargs, past_key_values)  # generate passes `cache` from 5.24 on
        blocks = self.moe_blocks()
        for block in blocks.values():
            block.attention_mask = attention_mask
            block.record_logits = output_router_logits
        try:
            pooling, _ = self._prepare_pooling(blocks, input_ids, kwargs.get("inputs_embeds"), past_key_values)
            out = self.lm(
                input_ids=input_ids,
                attention_mask=attention_mask,
                labels=labels,
                use_cache=use_cache,
                logits_to_keep=logits_to_keep,
                return_dict=True,
                **{cache_keyword(self.lm): past_key_values},
                **kwargs,
            )
            cache = output_cache(out)
            if pooling and cache is not None:
                last_ends = (self._document_ends(input_ids[:, -1]) if input_ids is not None
                             else torch.zeros(out.logits.shape[0], dtype=torch.bool, device=out.logits.device))
                cache.layermoe_pool = _PoolState(last_ends, {i: b.pool_out for i, b in pooling.items()})
            router_logits = classifier_logits = None
            if output_router_logits:
                router_logits = {i: b.last_router_logits for i, b in blocks.items()}
                classifier_logits = {i: b.last_classifier_logits for i, b in blocks.items() if b.classifier is not None}
        finally:
            for block in blocks.values():
                block.attention_mask = None
                block.record_logits = False
                block.last_router_logits = block.last_classifier_logits = None
                block.document_starts = block.pool_carry = block.pool_out = None
        # The family's output fields as this transformers version names them, plus ours.
        fields = {k: v for k, v in out.items() if k in _OUTPUT_FIELDS}
        return LayermoeCausalLMOutput(**fields, router_logits=router_logits, classifier_logits=classifier_logits)


# ----------------------------------------------------------------------------------------
# Freezing
# ----------------------------------------------------------------------------------------
def parameter_groups(model: LayermoeForCausalLM) -> dict[str, list[str]]:
    """Parameter names by role: router, classifier, expert0, experts_g1, experts_g2, ..., base.

    "base" is everything else: embeddings, attention, norms, lm_head and dense layers' MLPs.
    """
    groups: dict[str, list[str]] = {"router": [], "classifier": [], "expert0": []}
    for g in range(1, model.config.num_generations + 1):
        groups[f"experts_g{g}"] = []
    groups["base"] = []
    for name, _ in model.named_parameters():
        if ".mlp.router." in name:
            groups["router"].append(name)
        elif ".mlp.classifier." in name:
            groups["classifier"].append(name)
        elif ".mlp.expert0." in name:
            groups["expert0"].append(name)
        elif ".mlp.experts.g" in name:
            generation = name.split(".mlp.experts.g", 1)[1].split(".", 1)[0]
            groups.setdefault(f"experts_g{generation}", []).append(name)
        else:
            groups["base"].append(name)
    return groups


def register_auto_classes() -> None:
    """Make AutoConfig / AutoModelForCausalLM know "layermoe" (no trust_remote_code needed)."""
    from transformers import AutoConfig

    try:
        AutoConfig.register("layermoe", LayermoeConfig)
    except ValueError:
        pass  # already registered
    try:
        AutoModelForCausalLM.register(LayermoeConfig, LayermoeForCausalLM)
    except ValueError:
        pass


__all__ = [
    "LayermoeCausalLMOutput",
    "LayermoeExpertGroup",
    "LayermoeForCausalLM",
    "LayermoeMoeBlock",
    "LayermoePreTrainedModel",
    "parameter_groups",
    "register_auto_classes",
    "route_top_k",
]
