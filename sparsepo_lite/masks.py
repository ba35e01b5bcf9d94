"""Token masks: SparsePO's learned mask network and MaPO's activation masks, and their save/load.

Masks are computed at response positions only: ``[N]`` vectors aligned with the gathered
response tokens (row-major over the 2B rows), so prompt and padding never get a weight.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .models import unwrap
from .validation import check_finite_tensors

MAPO_HOOK_TYPES = ("mlp", "attn", "resid", "logits")
#: How a SparsePO mask net starts: "ones" (every token's mask starts near 1, so SparsePO starts as
#: TDPO1 and learns where to move weight) or "official" (the paper code's init: masks start near 0).
MASK_INITS = ("ones", "official")


def _layer_norm_eps(config) -> float:
    for name in ("rms_norm_eps", "layer_norm_epsilon", "layer_norm_eps", "norm_eps"):
        eps = getattr(config, name, None)
        if eps is not None:
            return float(eps)
    return 1e-5


class SparsePOMaskNet(nn.Module):
    """SparsePO ``simple_all`` mask (docs/masks.md) for one mask (reward or KL).

    m = ReLU( sum_l v_l * ReLU( w_l . LayerNorm(H_l) + b_l ) ), one LayerNorm shared by all
    layers, per-layer Linear(d, 1) with bias (``layer_weight[l]``, ``layer_bias[l]``), mixer
    Linear(L, 1) without bias (``mixer``). Kept in fp32. Two inits (``init``), LayerNorm (1, 0) in both:

    - ``"official"``: as the host model's ``_init_weights`` would (the paper's code): weights and
      mixer ~ N(0, init_std^2), biases 0. The mask starts near 0 on every token, and about half
      the units start cut by their ReLU; an all-zero mask is a minimum the loss can reach
      (z = 0) and the ReLUs cannot leave.
    - ``"ones"``: weights ~ N(0, init_std^2), biases 1, mixer 1/L: every unit starts near 1 and so
      does the mask (SparsePO starts as TDPO1), with small token-to-token differences for the
      weights to grow.
    """

    def __init__(
        self, num_layers: int, hidden_size: int, eps: float = 1e-5, init_std: float = 0.02, init: str = "ones"
    ):
        super().__init__()
        if init not in MASK_INITS:
            raise ValueError(f"mask init must be one of {MASK_INITS}, got {init!r}")
        self.norm = nn.LayerNorm(hidden_size, eps=eps)
        self.layer_weight = nn.Parameter(torch.empty(num_layers, hidden_size))
        self.layer_bias = nn.Parameter(torch.zeros(num_layers))
        self.mixer = nn.Parameter(torch.empty(num_layers))
        self.init_std = init_std
        self.init = init
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.layer_weight, std=self.init_std)
        if self.init == "official":
            nn.init.normal_(self.mixer, std=self.init_std)
            nn.init.zeros_(self.layer_bias)
        else:
            nn.init.constant_(self.mixer, 1.0 / self.mixer.numel())
            nn.init.ones_(self.layer_bias)
        self.norm.reset_parameters()

    def forward(self, layer_states: Sequence[torch.Tensor]) -> torch.Tensor:
        """layer_states: L tensors [N, d] (reference states of layers 1..L) -> mask [N] fp32 >= 0."""
        if len(layer_states) != self.layer_weight.shape[0]:
            raise ValueError(f"mask net expects {self.layer_weight.shape[0]} layer states, got {len(layer_states)}")
        out = None
        # One layer at a time: never stacks [L, N, d]. Under autograd each layer's term is
        # recomputed in backward, so the fp32 copy its LayerNorm would save (L x N x d x 4 bytes:
        # 6 GB for Llama-3-8B at 12k response tokens) is never kept; only the states themselves are.
        lean = torch.is_grad_enabled() and self.layer_weight.requires_grad
        for l, h in enumerate(layer_states):
            s = checkpoint(self._layer_score, h, l, use_reentrant=False) if lean else self._layer_score(h, l)
            out = self.mixer[l] * s if out is None else out + self.mixer[l] * s
        return F.relu(out)

    def _layer_score(self, h: torch.Tensor, l: int) -> torch.Tensor:
        return F.relu(self.norm(h.to(self.layer_weight.dtype)) @ self.layer_weight[l] + self.layer_bias[l])


class SparsePOMasks(nn.Module):
    """The reward mask m^u and the KL mask m^d: one common net (default) or two independent nets.

    Lives outside the (peft) policy and is trained and saved beside the adapter: a peft model
    would otherwise freeze it.
    """

    def __init__(
        self,
        num_layers: int,
        hidden_size: int,
        *,
        independent: bool = False,
        eps: float = 1e-5,
        init_std: float = 0.02,
        init: str = "ones",
    ):
        super().__init__()
        self.independent = independent
        make = lambda: SparsePOMaskNet(num_layers, hidden_size, eps=eps, init_std=init_std, init=init)
        if independent:
            self.reward_net, self.kl_net = make(), make()
        else:
            self.common_net = make()

    @classmethod
    def for_model(
        cls, model, *, independent: bool = False, init_std: float = 0.02, init: str = "ones"
    ) -> "SparsePOMasks":
        """Masks sized for a transformers causal LM (or a peft model wrapping one)."""
        lm = unwrap(model)
        config = lm.config
        layers = getattr(config, "num_hidden_layers", None)
        hidden = getattr(config, "hidden_size", None)
        if not layers or not hidden:
            raise ValueError(f"cannot read num_hidden_layers/hidden_size from {type(config).__name__}")
        head = lm.get_output_embeddings()
        width = getattr(head, "in_features", None)
        if width is not None and width != hidden:
            # the nets weigh every layer's state with one [L, hidden] table: the last must be as wide
            raise ValueError(
                f"{type(lm).__name__}: SparsePO's mask nets read every layer's hidden state, but this model "
                f"projects its last one from {hidden} to {width} features (OPT's "
                "word_embed_proj_dim); not supported for loss_type sparsepo"
            )
        return cls(layers, hidden, independent=independent, eps=_layer_norm_eps(config), init_std=init_std, init=init)

    def forward(self, layer_states: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """layer_states: L tensors [N, d] -> (reward mask [N], KL mask [N])."""
        if self.independent:
            return self.reward_net(layer_states), self.kl_net(layer_states)
        m = self.common_net(layer_states)
        return m, m


def normalize_per_sequence(mask: torch.Tensor, seq_ids: torch.Tensor, num_seqs: int, eps: float = 1e-6) -> torch.Tensor:
    """``mask`` [N] divided by its mean over each sequence's tokens (``seq_ids`` [N] in
    [0, num_seqs)): every response then carries the same total weight as with unit masks, and the
    mask can only move weight between tokens, never remove it all (``mask_normalize``)."""
    acc = torch.float64 if mask.dtype == torch.float64 else torch.float32
    m = mask.to(acc)
    total = torch.zeros(num_seqs, dtype=acc, device=m.device).index_add(0, seq_ids, m)
    count = torch.zeros(num_seqs, dtype=acc, device=m.device).index_add(0, seq_ids, torch.ones_like(m))
    return m * (count / (total + eps))[seq_ids]


# --- MaPO -------------------------------------------------------------------------------------


def minmax_over_response(values: torch.Tensor, response: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-row min-max rescaling over response positions (MaPO ``zn_rescale``).

    values, response: [R, T]. Returns [R, T] fp32 in [0, 1], 0 outside the response. z-scoring
    first (as the official code does) changes nothing after min-max. Rows whose response values
    span less than ``eps`` (one-token responses, constant features) carry no ranking: they get 1
    (uniform weight) instead of the official code's NaN.
    """
    v = values.float()
    r = response.bool()
    lo = torch.where(r, v, torch.full_like(v, float("inf"))).amin(dim=1, keepdim=True)
    hi = torch.where(r, v, torch.full_like(v, float("-inf"))).amax(dim=1, keepdim=True)
    span = hi - lo
    flat = ~(span > eps)  # also catches rows without response tokens (inf - inf = nan)
    scaled = (v - lo) / torch.where(flat, torch.ones_like(span), span)
    scaled = torch.where(flat, torch.ones_like(scaled), scaled)
    return torch.where(r, scaled, torch.zeros_like(scaled))


_LLAMA_POINTS = {
    # (module path inside a decoder layer, "in" = the module's input, "out" = its output)
    "mlp": [("mlp.down_proj", "in")],  # the MLP hidden state after the non-linearity
    "attn": [
        ("self_attn.q_proj", "out"),
        ("self_attn.k_proj", "out"),
        ("self_attn.v_proj", "out"),
        ("self_attn.o_proj", "in"),
    ],  # o_proj input = attention output before the projection
    "resid": [("input_layernorm", "out"), ("post_attention_layernorm", "out"), ("mlp", "out"), ("", "out")],
}


def _first(x):
    return x[0] if isinstance(x, (tuple, list)) else x


def mapo_hook_points(model, hook_types: Sequence[str] = MAPO_HOOK_TYPES) -> List[Tuple[nn.Module, str, str]]:
    """The modules MaPO's hooks attach to in ``model`` (a causal LM, peft-wrapped or not), as
    (module, hook type, ``"in"`` or ``"out"``). Raises ``ValueError`` naming the model and the first
    module it lacks: MaPO's hook points are those of Llama-family decoder layers (Llama, Mistral,
    Qwen2, SmolLM2, ...), which others (Phi-3's fused ``qkv_proj``, OLMo-2's norms) do not all have."""
    unknown = set(hook_types) - set(MAPO_HOOK_TYPES)
    if unknown:
        raise ValueError(f"unknown MaPO hook types {sorted(unknown)}; choose from {MAPO_HOOK_TYPES}")
    lm = unwrap(model)
    backbone = getattr(lm, "model", None)
    layers = getattr(backbone, "layers", None)
    if not layers:
        raise ValueError(
            f"MaPO activation masks need Llama-family decoder layers (model.layers); {type(lm).__name__} has none"
        )
    wanted = [
        (layer, path, kind, where)
        for kind in hook_types
        for layer in layers
        for path, where in _LLAMA_POINTS.get(kind, [])
    ]
    if "resid" in hook_types:
        wanted += [(backbone, "embed_tokens", "resid", "out"), (backbone, "norm", "resid", "out")]
    points = []
    for parent, path, kind, where in wanted:
        try:
            points.append((parent.get_submodule(path) if path else parent, kind, where))
        except AttributeError:
            raise ValueError(
                f"MaPO activation masks ({kind!r} hooks) need Llama-family decoder layers: {type(lm).__name__} has no "
                f"{path!r} in {type(parent).__name__}; use mapo_mapping uniform, or another loss_type"
            ) from None
    return points


@contextmanager
def record_activation_means(model, hook_types: Sequence[str] = MAPO_HOOK_TYPES):
    """Record, per hook point (:func:`mapo_hook_points`), the feature mean of the activation:
    {type: [tensors [R, T]]}: on every decoder layer, plus the embedding and final-norm outputs
    (resid). ``logits`` is derived afterwards from the final hidden state (see :func:`mapo_masks`),
    never from [T, V]."""
    points = mapo_hook_points(model, hook_types)
    store: Dict[str, List[torch.Tensor]] = {t: [] for t in hook_types}
    handles = []

    def add(module, kind, where):
        def rec(x):
            store[kind].append(_first(x).detach().float().mean(dim=-1))

        if where == "in":  # Llama calls o_proj and down_proj with one positional input
            handles.append(module.register_forward_pre_hook(lambda m, args: rec(args[0])))
        else:
            handles.append(module.register_forward_hook(lambda m, args, out: rec(out)))

    try:
        for module, kind, where in points:
            add(module, kind, where)
        yield store
    finally:
        for h in handles:
            h.remove()


def mapo_masks(
    store: Dict[str, List[torch.Tensor]],
    response: torch.Tensor,
    logit_means: Optional[torch.Tensor] = None,
    mapping: str = "zn_rescale",
) -> torch.Tensor:
    """MaPO mask [R, T-1] from recorded activation means, detached.

    store: {type: [R, T] feature means}; response: [R, T-1] response indicator of the shifted
    positions (position t predicts token t+1); logit_means: [R, T] mean logit per position (the
    ``logits`` type). Each hook is min-max rescaled over its row's response tokens, averaged
    within its type, then over the types present, and multiplied by the response indicator.
    ``mapping="uniform"`` gives the response indicator itself (MaPO-uniform = TDPO1).
    """
    r = response.bool()
    if mapping == "uniform":
        return r.float()
    if mapping != "zn_rescale":
        raise ValueError(f"unknown MaPO mapping {mapping!r}; expected 'zn_rescale' or 'uniform'")
    t1 = r.shape[1]
    per_type = []
    groups = {k: list(v) for k, v in store.items()}
    if logit_means is not None:
        groups["logits"] = [logit_means]
    for maps in groups.values():
        if maps:
            per_type.append(torch.stack([minmax_over_response(a[:, :t1], r) for a in maps]).mean(0))
    if not per_type:
        raise ValueError("no MaPO activations were recorded")
    return (torch.stack(per_type).mean(0) * r).detach()


# --- saving ----------------------------------------------------------------------------------

MASK_WEIGHTS = "mask_net.safetensors"
MASK_CONFIG = "mask_net.json"


def save_masks(masks: SparsePOMasks, out_dir: str) -> None:
    """Mask net weights (safetensors) and its shape/options (JSON), beside the adapter."""
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    net = masks.reward_net if masks.independent else masks.common_net
    meta = {
        "num_layers": net.layer_weight.shape[0],
        "hidden_size": net.layer_weight.shape[1],
        "independent": masks.independent,
        "eps": net.norm.eps,
    }
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in masks.state_dict().items()}, os.path.join(out_dir, MASK_WEIGHTS)
    )
    with open(os.path.join(out_dir, MASK_CONFIG), "w") as f:
        json.dump(meta, f, indent=1)


def load_masks(path: str) -> SparsePOMasks:
    """Inverse of :func:`save_masks` (no pickle: safetensors + JSON)."""
    from safetensors.torch import load_file

    cfg_path, w_path = os.path.join(path, MASK_CONFIG), os.path.join(path, MASK_WEIGHTS)
    for p in (cfg_path, w_path):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"no saved mask network: {p} is missing")
    try:
        with open(cfg_path) as f:
            meta = json.load(f)
        masks = SparsePOMasks(meta["num_layers"], meta["hidden_size"], independent=meta["independent"], eps=meta["eps"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{cfg_path}: not a mask net description ({type(exc).__name__}: {exc})") from None
    try:
        weights = load_file(w_path)
    except Exception as exc:  # safetensors raises its own error types
        raise ValueError(f"{w_path}: not a readable safetensors file ({exc})") from None
    check_finite_tensors(w_path, weights)
    try:
        masks.load_state_dict(weights)
    except RuntimeError as exc:
        raise ValueError(f"{w_path}: does not fit {MASK_CONFIG} ({str(exc).splitlines()[0]})") from None
    return masks
