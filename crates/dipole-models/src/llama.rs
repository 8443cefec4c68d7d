//! The Llama decoder family: Llama 2/3, Mistral and Qwen2 share one graph (pre-norm RMSNorm,
//! rotate-half RoPE, grouped-query attention, SwiGLU MLP) and differ only in what `ModelConfig`
//! makes explicit: q/k/v biases, sliding windows, tied embeddings and rope scaling.
//!
//! Every projection is a [`LoraLinear`], so adapters attach to any of them by HF module name.

use burn::module::{Module, Param};
use burn::tensor::activation::silu;
use burn::tensor::module::{embedding, linear};
use burn::tensor::{Bool, DType, Int, Tensor, TensorData, backend::Backend};
use dipole_lora::{AdapterMode, LoraLinear, cast_to};

use crate::config::ModelConfig;
use crate::precision::MixedPrecision;
use crate::rope;

/// Root-mean-square layer norm, computed as transformers does: `x / sqrt(mean(x^2) + eps) * weight`.
#[derive(Module, Debug)]
pub struct RmsNorm<B: Backend> {
    pub weight: Param<Tensor<B, 1>>,
    pub eps: f64,
}

impl<B: Backend> RmsNorm<B> {
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let variance = x.clone().powi_scalar(2).mean_dim(D - 1);
        let normed = x * variance.add_scalar(self.eps).sqrt().recip();
        normed * self.weight.val().unsqueeze::<D>()
    }
}

#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    pub q_proj: LoraLinear<B>,
    pub k_proj: LoraLinear<B>,
    pub v_proj: LoraLinear<B>,
    pub o_proj: LoraLinear<B>,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

/// Keys and values of one layer, after RoPE and before the GQA repeat: `[batch, kv_heads, len, head_dim]`.
#[derive(Clone, Debug)]
pub struct LayerCache<B: Backend> {
    pub key: Tensor<B, 4>,
    pub value: Tensor<B, 4>,
}

/// Per-layer key/value cache for incremental decoding.
#[derive(Clone, Debug)]
pub struct KvCache<B: Backend> {
    pub layers: Vec<Option<LayerCache<B>>>,
}

impl<B: Backend> KvCache<B> {
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: vec![None; num_layers],
        }
    }

    /// Number of positions already cached.
    pub fn len(&self) -> usize {
        self.layers
            .first()
            .and_then(|l| l.as_ref())
            .map(|c| c.key.dims()[2])
            .unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<B: Backend> Attention<B> {
    fn forward(
        &self,
        x: Tensor<B, 3>,
        rotary: &rope::Rotary<B>,
        mask: Option<Tensor<B, 4, Bool>>,
        cache: Option<&mut Option<LayerCache<B>>>,
    ) -> Tensor<B, 3> {
        let [batch, len, _] = x.dims();
        let (h, kvh, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let heads = |t: Tensor<B, 3>, n: usize| t.reshape([batch, len, n, d]).swap_dims(1, 2);
        let q = rotary.apply(heads(self.q_proj.forward(x.clone()), h));
        let mut k = rotary.apply(heads(self.k_proj.forward(x.clone()), kvh));
        let mut v = heads(self.v_proj.forward(x), kvh);
        if let Some(slot) = cache {
            if let Some(past) = slot.take() {
                k = Tensor::cat(vec![past.key, k], 2);
                v = Tensor::cat(vec![past.value, v], 2);
            }
            *slot = Some(LayerCache {
                key: k.clone(),
                value: v.clone(),
            });
        }
        let (k, v) = (repeat_kv(k, h / kvh), repeat_kv(v, h / kvh));
        let out = attention(q, k, v, mask);
        self.o_proj.forward(out.swap_dims(1, 2).reshape([batch, len, h * d]))
    }
}

/// Scaled dot-product attention, decomposed (QKᵀ, mask, softmax, ·V) as burn's own fallback is: that
/// form is what autodiff differentiates, and using it for inference too makes a frozen reference
/// bit-identical to an equal policy (step 0 of DPO has rewards exactly 0, as in TRL). `mask` is true
/// where a key is hidden (`[batch, 1, q_len, k_len]`); `None` means causal with no padding. Under
/// mixed precision the scores are masked and softmaxed in f32, as transformers' eager attention does.
fn attention<B: Backend>(q: Tensor<B, 4>, k: Tensor<B, 4>, v: Tensor<B, 4>, mask: Option<Tensor<B, 4, Bool>>) -> Tensor<B, 4> {
    let [batch, heads, q_len, d] = q.dims();
    let k_len = k.dims()[2];
    let compute = q.dtype();
    let scores = q.matmul(k.swap_dims(2, 3)).mul_scalar(1.0 / (d as f64).sqrt());
    let scores = cast_to(scores, DType::F32);
    let mask = mask.unwrap_or_else(|| {
        // bottom-right aligned, so cached decoding (k_len > q_len) sees every past key
        Tensor::<B, 2, Bool>::tril_mask([q_len, k_len], (k_len - q_len) as i64, &scores.device()).reshape([1, 1, q_len, k_len])
    });
    let scores = scores.mask_fill(mask.expand([batch, heads, q_len, k_len]), f32::NEG_INFINITY);
    // NaN-safe softmax: a fully masked row gives zeros instead of 0/0.
    let max = scores.clone().max_dim(3).clamp_min(f32::MIN);
    let numerator = (scores - max).exp();
    let sum = numerator.clone().sum_dim(3).clamp_min(f32::MIN_POSITIVE);
    let probs = cast_to(numerator / sum, compute);
    probs.matmul(v)
}

/// `[b, kv_heads, t, d]` -> `[b, kv_heads * n_rep, t, d]`, each kv head repeated for its query group.
fn repeat_kv<B: Backend>(x: Tensor<B, 4>, n_rep: usize) -> Tensor<B, 4> {
    if n_rep == 1 {
        return x;
    }
    let [b, kvh, t, d] = x.dims();
    x.unsqueeze_dim::<5>(2)
        .expand([b, kvh, n_rep, t, d])
        .reshape([b, kvh * n_rep, t, d])
}

#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    pub gate_proj: LoraLinear<B>,
    pub up_proj: LoraLinear<B>,
    pub down_proj: LoraLinear<B>,
}

impl<B: Backend> Mlp<B> {
    fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        self.down_proj
            .forward(silu(self.gate_proj.forward(x.clone())) * self.up_proj.forward(x))
    }
}

#[derive(Module, Debug)]
pub struct DecoderLayer<B: Backend> {
    pub self_attn: Attention<B>,
    pub mlp: Mlp<B>,
    pub input_layernorm: RmsNorm<B>,
    pub post_attention_layernorm: RmsNorm<B>,
    /// Attention window of this layer, when it uses sliding-window attention.
    pub sliding_window: Option<usize>,
}

/// A decoder-only causal language model. Field names follow the HF checkpoint
/// (`model.embed_tokens`, `model.layers.N...`, `model.norm`, `lm_head`).
#[derive(Module, Debug)]
pub struct CausalLm<B: Backend> {
    /// `[vocab, hidden]`
    pub embed_tokens: Param<Tensor<B, 2>>,
    pub layers: Vec<DecoderLayer<B>>,
    pub norm: RmsNorm<B>,
    /// `None` when the head is tied to the embeddings.
    pub lm_head: Option<LoraLinear<B>>,
    pub config: ModelConfig,
    /// Which dtype the matmuls compute in (see [`MixedPrecision`]); set with
    /// [`set_mixed_precision`](Self::set_mixed_precision).
    pub mixed_precision: MixedPrecision,
}

impl<B: Backend> CausalLm<B> {
    /// Logits `[batch, len, vocab]` for right-padded `input_ids` `[batch, len]`; `attention_mask`
    /// (1 = token, 0 = padding) keeps padding out of every real token's attention.
    pub fn forward(
        &self,
        input_ids: Tensor<B, 2, Int>,
        attention_mask: Option<Tensor<B, 2, Int>>,
    ) -> Tensor<B, 3> {
        let hidden = self.forward_hidden(input_ids, attention_mask, None);
        self.logits(hidden)
    }

    /// Projects final hidden states `[.., hidden]` to logits `[.., vocab]`. Split from the trunk so
    /// callers can compute log-probs chunk by chunk without a whole `[rows, T, vocab]` tensor.
    /// The logits come back in the hidden states' dtype (f32) whatever the matmul's precision.
    pub fn logits<const D: usize>(&self, hidden: Tensor<B, D>) -> Tensor<B, D> {
        let dtype = hidden.dtype();
        let logits = match &self.lm_head {
            Some(head) => head.forward(hidden),
            None => {
                let compute = self.mixed_precision.compute_dtype().unwrap_or(dtype);
                linear(cast_to(hidden, compute), cast_to(self.embed_tokens.val(), compute).transpose(), None)
            }
        };
        cast_to(logits, dtype)
    }

    /// Final normed hidden states `[batch, len, hidden]`. With a cache, `input_ids` are the new
    /// positions after the cached ones, and the cache is extended.
    pub fn forward_hidden(
        &self,
        input_ids: Tensor<B, 2, Int>,
        attention_mask: Option<Tensor<B, 2, Int>>,
        mut cache: Option<&mut KvCache<B>>,
    ) -> Tensor<B, 3> {
        let device = input_ids.device();
        let [batch, len] = input_ids.dims();
        let past = cache.as_ref().map(|c| c.len()).unwrap_or(0);
        let total = past + len;
        let cfg = &self.config;
        let (cos, sin) = rope::tables::<B>(&cfg.rope, cfg.head_dim, past, len, &device);
        // In the dtype the projections come out in, so no layer casts (and keeps for backward) a copy.
        let (cos, sin) = match self.mixed_precision.compute_dtype() {
            Some(dtype) => (cast_to(cos, dtype), cast_to(sin, dtype)),
            None => (cos, sin),
        };
        let rotary = rope::Rotary::new(cos, sin);

        let padding = attention_mask.map(|m| {
            let [mb, ml] = m.dims();
            assert!(
                mb == batch && ml == total,
                "attention_mask has shape [{mb}, {ml}], expected [{batch}, {total}] (cached + new positions)"
            );
            m.equal_elem(0)
        });
        // Right padding never changes a real token's outputs; skip the mask when nothing is padded.
        let padding = padding.filter(|p| p.clone().any().into_data().iter::<bool>().next().unwrap_or(false));
        let build_mask = |window: Option<usize>| -> Option<Tensor<B, 4, Bool>> {
            let window = window.filter(|w| *w < total);
            if padding.is_none() && window.is_none() {
                return None;
            }
            let mut mask = Tensor::<B, 2, Bool>::tril_mask([len, total], past as i64, &device);
            if let Some(w) = window {
                let too_far = Tensor::<B, 2, Bool>::triu_mask([len, total], past as i64 - w as i64 + 1, &device);
                mask = mask.bool_or(too_far);
            }
            let mut mask = mask.reshape([1, 1, len, total]).expand([batch, 1, len, total]);
            if let Some(p) = &padding {
                mask = mask.bool_or(p.clone().reshape([batch, 1, 1, total]).expand([batch, 1, len, total]));
            }
            Some(mask)
        };
        let full_mask = build_mask(None);

        let mut x = embedding(self.embed_tokens.val(), input_ids);
        for (i, layer) in self.layers.iter().enumerate() {
            let mask = match layer.sliding_window {
                Some(w) if w < total => build_mask(Some(w)),
                _ => full_mask.clone(),
            };
            let slot = cache.as_mut().map(|c| &mut c.layers[i]);
            let attn = layer.self_attn.forward(
                layer.input_layernorm.forward(x.clone()),
                &rotary,
                mask,
                slot,
            );
            // the residual stream keeps the parameters' dtype; only the branches compute in half
            let dtype = x.dtype();
            x = x + cast_to(attn, dtype);
            let mlp = layer.mlp.forward(layer.post_attention_layernorm.forward(x.clone()));
            x = x + cast_to(mlp, dtype);
        }
        self.norm.forward(x)
    }

    /// Turns mixed precision on or off for every matmul (parameters keep their dtype).
    pub fn set_mixed_precision(&mut self, precision: MixedPrecision) {
        self.mixed_precision = precision;
        let dtype = precision.compute_dtype();
        for (_, linear) in self.linears_mut() {
            linear.compute_dtype = dtype;
        }
    }

    /// Chooses, for every projection at once, which adapter the forward pass uses.
    pub fn set_adapter_mode(&mut self, mode: AdapterMode) {
        for layer in &mut self.layers {
            for proj in layer.projections_mut() {
                proj.mode = mode;
            }
        }
        if let Some(head) = &mut self.lm_head {
            head.mode = mode;
        }
    }
}

impl<B: Backend> DecoderLayer<B> {
    /// The seven projections with their HF module names.
    pub fn named_projections(&self) -> [(&'static str, &LoraLinear<B>); 7] {
        [
            ("self_attn.q_proj", &self.self_attn.q_proj),
            ("self_attn.k_proj", &self.self_attn.k_proj),
            ("self_attn.v_proj", &self.self_attn.v_proj),
            ("self_attn.o_proj", &self.self_attn.o_proj),
            ("mlp.gate_proj", &self.mlp.gate_proj),
            ("mlp.up_proj", &self.mlp.up_proj),
            ("mlp.down_proj", &self.mlp.down_proj),
        ]
    }

    pub fn projections_mut(&mut self) -> [&mut LoraLinear<B>; 7] {
        [
            &mut self.self_attn.q_proj,
            &mut self.self_attn.k_proj,
            &mut self.self_attn.v_proj,
            &mut self.self_attn.o_proj,
            &mut self.mlp.gate_proj,
            &mut self.mlp.up_proj,
            &mut self.mlp.down_proj,
        ]
    }
}

/// Token ids `[rows][len]` (already padded to one length) as an Int tensor.
pub fn ids_tensor<B: Backend>(rows: &[Vec<u32>], device: &B::Device) -> Tensor<B, 2, Int> {
    let len = rows.first().map(Vec::len).unwrap_or(0);
    let flat: Vec<i64> = rows
        .iter()
        .flat_map(|r| {
            assert_eq!(r.len(), len, "every row must be padded to the same length");
            r.iter().map(|&t| t as i64)
        })
        .collect();
    Tensor::from_data(TensorData::new(flat, [rows.len(), len]), device)
}
