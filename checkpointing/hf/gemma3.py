"""``Gemma3ForCausalLM`` (``model_type: gemma3_text``): sandwich norms, per-head QK-norm, sliding
windows on the ``sliding_attention`` layers (one size) with their own RoPE base, embeddings scaled
by sqrt(d_model), GeGLU (tanh GELU) MLP, and every RMSNorm as ``x_hat * (1 + w)``.

Our norms are ``x_hat * w``: the stored weight differs by one (``Same(offset=1)``), exact in fp32
up to one rounding of ``w - 1``. The scaled embedding and the activation have no such rewrite: they
are ``model.embed_scale=true`` and ``model.ffn_activation=gelu_tanh`` in our model, and export
refuses a model without them. ``query_pre_attn_scalar`` is the head dim (our softmax scale)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict

from checkpointing.hf.family import Family, check_plain, gqa_config_json, gqa_model_config, one_window, windows_of
from checkpointing.hf.mapping import BASE_RULES, GQA_RULES, check_act, refuse, refuse_import, rope_from_hf

if TYPE_CHECKING:  # annotations only: model/ is imported where it is used
    from model.config import ModelConfig

_ONE = 1.0
_RULES = [
    (r"norm\.weight", ("model.norm.weight", _ONE)),
    (r"layers\.(\d+)\.attention_norm\.weight", (r"model.layers.\1.input_layernorm.weight", _ONE)),
    (r"layers\.(\d+)\.post_attention_norm\.weight", (r"model.layers.\1.post_attention_layernorm.weight", _ONE)),
    (r"layers\.(\d+)\.ffn_norm\.weight", (r"model.layers.\1.pre_feedforward_layernorm.weight", _ONE)),
    (r"layers\.(\d+)\.post_ffn_norm\.weight", (r"model.layers.\1.post_feedforward_layernorm.weight", _ONE)),
    (r"layers\.(\d+)\.attention\.q_norm\.weight", (r"model.layers.\1.self_attn.q_norm.weight", _ONE)),
    (r"layers\.(\d+)\.attention\.k_norm\.weight", (r"model.layers.\1.self_attn.k_norm.weight", _ONE)),
]
_ACTS = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh", "silu": "silu"}


class Gemma3(Family):
    hf_class, model_type = "Gemma3ForCausalLM", "gemma3_text"
    rules = _RULES + BASE_RULES + GQA_RULES  # the offset norm rules first

    def check(self, cfg: ModelConfig) -> None:
        who = self.hf_class
        if cfg.moe.n_experts > 0:
            refuse(f"model.moe.n_experts={cfg.moe.n_experts}: {who} is dense")
        check_plain(cfg, who, embed_scale=True, activation="gelu_tanh", norm_placement="pre+post",
                    qk_norm="head", local_theta=True)
        one_window(cfg, who)
        if cfg.rope.yarn_factor > 1:
            refuse(f"model.rope.yarn_factor={cfg.rope.yarn_factor}: {who} would apply YaRN to the global layers "
                   "only, ours applies it to every layer")

    def config_json(self, cfg: ModelConfig, dtype: str) -> Dict[str, Any]:
        from model.config import gqa_head_dim

        out = gqa_config_json(cfg, dtype, self.hf_class, self.model_type)
        del out["hidden_act"], out["rope_theta"]
        w = windows_of(cfg)
        local = cfg.rope.local_theta or cfg.rope.theta
        out.update({
            "hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": gqa_head_dim(cfg),
            "sliding_window": one_window(cfg, self.hf_class) or None,
            "layer_types": ["sliding_attention" if x else "full_attention" for x in w],
            "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": float(cfg.rope.theta)},
                                "sliding_attention": {"rope_type": "default", "rope_theta": float(local)}},
            "final_logit_softcapping": None, "attn_logit_softcapping": None,
            "use_bidirectional_attention": False,
        })
        return out

    def model_config(self, hf: Dict[str, Any]) -> ModelConfig:
        act = check_act(hf, "hidden_activation", tuple(_ACTS)) if "hidden_activation" in hf else "gelu_pytorch_tanh"
        for key in ("final_logit_softcapping", "attn_logit_softcapping"):
            if hf.get(key) is not None:
                refuse_import(f"{key}={hf[key]}: our model has no logit softcapping")
        if hf.get("use_bidirectional_attention"):
            refuse_import("use_bidirectional_attention=true: our attention is causal")
        d, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
        head_dim = int(hf.get("head_dim") or d // heads)
        if int(hf.get("query_pre_attn_scalar", 256)) != head_dim:
            refuse_import(f"query_pre_attn_scalar={hf.get('query_pre_attn_scalar', 256)}: our softmax scale is "
                          f"1/sqrt(head_dim={head_dim})")
        n = int(hf["num_hidden_layers"])
        types = hf.get("layer_types") or ["sliding_attention" if (i + 1) % int(hf.get("sliding_window_pattern", 6))
                                          else "full_attention" for i in range(n)]
        params = hf.get("rope_parameters") or {}
        if params and "full_attention" not in params:
            params = {"full_attention": params, "sliding_attention": {"rope_type": "default"}}
        glob = rope_from_hf(hf, params.get("full_attention") or {
            "rope_type": "default", "rope_theta": hf.get("rope_theta", 1_000_000.0)})
        local = rope_from_hf(hf, params.get("sliding_attention") or {
            "rope_type": "default", "rope_theta": hf.get("rope_local_base_freq", 10_000.0)})
        if glob.yarn_factor > 1 or local.yarn_factor > 1:
            refuse_import("YaRN on Gemma 3 layers: ours would apply it to every layer")
        if "sliding_attention" in types:
            glob.local_theta = local.theta
        cfg = gqa_model_config({**hf, "tie_word_embeddings": hf.get("tie_word_embeddings", True)}, rope=glob,
                               attention={"qk_norm": True}, norm_placement="pre+post", embed_scale=True,
                               ffn_activation=_ACTS[act])
        cfg.attention.layer_windows = [int(hf.get("sliding_window") or 4096) if t == "sliding_attention" else 0
                                       for t in types]
        if len(types) != n:
            refuse_import(f"layer_types has {len(types)} entries for {n} layers")
        return cfg
