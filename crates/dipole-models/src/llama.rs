//! The Llama decoder family: Llama 2/3, Mistral and Qwen2 share one graph (pre-norm RMSNorm,
//! rotate-half RoPE, grouped-query attention, SwiGLU MLP) and differ only in what `ModelConfig`
//! makes explicit: q/k/v biases, sliding windows, tied embeddings and rope scaling.
//!
//! Every projection is a [`LoraLinear`], so adapters attach to any of them by HF module name.

use burn::module::{Module, Param};
use burn::tensor::module::{embedding, linear};
use burn::tensor::{Bool, DType, Int, Tensor, TensorData, backend::Backend};
use dipole_kernels::head::{HeadLogps, HeadOptions, head_logps};
use dipole_kernels::recompute::{RecomputeOptions, try_recomputed_attention};
use dipole_lora::{AdapterMode, LoraLinear, cast_to};

use crate::checkpointing::{LayerTape, Pass, Rows, untracked};
use crate::config::ModelConfig;
use crate::fused;
use crate::packing::PackPlan;
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

/// One forward pass's RoPE rotations: keys', and queries' with attention's `1/sqrt(head_dim)` folded in.
#[derive(Clone)]
pub(crate) struct Rotations<B: Backend> {
    key: rope::Rotary<B>,
    query: rope::Rotary<B>,
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
        rotary: &Rotations<B>,
        mask: Tensor<B, 4, Bool>,
        cache: Option<&mut Option<LayerCache<B>>>,
        recompute: bool,
    ) -> Tensor<B, 3> {
        let (h, kvh) = (self.num_heads, self.num_kv_heads);
        let q = fused::split_heads(self.q_proj.forward(x.clone()), h, Some(&rotary.query));
        let mut k = fused::split_heads(self.k_proj.forward(x.clone()), kvh, Some(&rotary.key));
        let mut v = fused::split_heads(self.v_proj.forward(x), kvh, None);
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
        let out = attention(q, k, v, mask, recompute);
        self.o_proj.forward(fused::merge_heads(out))
    }
}

/// Dot-product attention of queries already scaled by `1/sqrt(head_dim)` (see
/// [`Rotary::scaled`](rope::Rotary::scaled)): QKᵀ, masked softmax (fused on the CPU backend, see
/// [`fused`]), ·V. Inference runs the same ops as training, which makes a frozen reference
/// bit-identical to an equal policy (step 0 of DPO has rewards exactly 0, as in TRL). `mask`
/// `[batch, heads or 1, q_len, k_len]` is true where a key is hidden. Under mixed precision the scores are
/// masked and softmaxed in f32, as transformers' eager attention does. With `recompute`, under
/// autodiff, the probabilities are not kept for the backward pass but made again there
/// (`dipole_kernels::recompute`).
fn attention<B: Backend>(q: Tensor<B, 4>, k: Tensor<B, 4>, v: Tensor<B, 4>, mask: Tensor<B, 4, Bool>, recompute: bool) -> Tensor<B, 4> {
    let (q, k, v, mask) = if recompute && B::ad_enabled(&q.device()) {
        match try_recomputed_attention((q, k, v, mask), RecomputeOptions::default()) {
            Ok(out) => return out,
            Err(inputs) => inputs,
        }
    } else {
        (q, k, v, mask)
    };
    let compute = q.dtype();
    let scores = cast_to(q.matmul(k.swap_dims(2, 3)), DType::F32);
    let probs = cast_to(fused::masked_softmax(scores, mask), compute);
    probs.matmul(v)
}

/// The embeddings of `ids` as the f32 residual stream (the table may be stored in bf16 or f16).
pub(crate) fn embed_rows<B: Backend>(table: Tensor<B, 2>, ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
    cast_to(embedding(table, ids), DType::F32)
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
            .forward(fused::silu_mul(self.gate_proj.forward(x.clone()), self.up_proj.forward(x)))
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
    /// Whether [`forward_hidden_pairs`](Self::forward_hidden_pairs) runs a pair's common prefix once
    /// (default) or every row whole.
    pub prefix_sharing: bool,
    /// Whether [`forward_hidden_pairs`](Self::forward_hidden_pairs) may pack a batch's sequences
    /// end to end into fewer rows (padding-free, see [`PackPlan`]) when that runs fewer positions
    /// than prefix sharing or whole rows.
    pub padding_free: bool,
    /// Whether training keeps no attention probabilities for the backward pass and makes them again
    /// there instead (`dipole_kernels::recompute`): memory that grows with T² per layer traded for
    /// one more `QKᵀ` and softmax per layer in the backward pass.
    pub attention_recompute: bool,
    /// Whether training steps (`dipole_train`'s `preference_step`, `sft_step`) run the policy's
    /// `*_checkpointed` forward passes, which keep only each decoder layer's input for the backward
    /// pass (see [`LayerTape`]).
    pub layer_recompute: bool,
    /// Whether [`head_logps`](Self::head_logps) runs the LM head fused with the log-probs, tile by
    /// tile (default), or declines so that callers make the whole logits.
    pub fused_head: bool,
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
                let table = self.embed_tokens.val();
                if !table.is_require_grad() && table.dtype() != compute {
                    // a frozen table held in another dtype: cast inside the product, not kept
                    let mut dims = hidden.dims();
                    let rows = dims[..D - 1].iter().product();
                    dims[D - 1] = self.config.vocab_size;
                    let x = cast_to(hidden, compute).reshape([rows, self.config.hidden_size]);
                    dipole_kernels::frozen::frozen_matmul(x, table.transpose()).reshape(dims)
                } else {
                    linear(cast_to(hidden, compute), cast_to(table, compute).transpose(), None)
                }
            }
        };
        cast_to(logits, dtype)
    }

    /// Log-probs of `labels` `[positions]` under final hidden states `[positions, hidden]`, with the
    /// statistics of [`HeadLogps`], through the LM head without ever holding the `[positions,
    /// vocab]` logits (see `dipole_kernels::head`). `None` when the head is more than its weight
    /// (a LoRA adapter on `lm_head`) or [`fused_head`](Self::fused_head) is off: callers then
    /// use [`logits`](Self::logits).
    pub fn head_logps(&self, hidden: Tensor<B, 2>, labels: Tensor<B, 1, Int>) -> Option<HeadLogps<B>> {
        let (weight, compute_dtype) = match (&self.lm_head, self.fused_head) {
            (_, false) => return None,
            (Some(head), true) => (head.plain_weight()?, head.compute_dtype),
            (None, true) => (self.embed_tokens.val().transpose(), self.mixed_precision.compute_dtype()),
        };
        Some(head_logps(hidden, weight, labels, HeadOptions { compute_dtype, ..HeadOptions::default() }))
    }

    /// Whether [`head_logps`](Self::head_logps) runs (or declines).
    pub fn fuses_head(&self) -> bool {
        self.fused_head && self.lm_head.as_ref().is_none_or(|head| head.plain_weight().is_some())
    }

    /// Final normed hidden states `[batch, len, hidden]`. With a cache, `input_ids` are the new
    /// positions after the cached ones, and the cache is extended.
    pub fn forward_hidden(
        &self,
        input_ids: Tensor<B, 2, Int>,
        attention_mask: Option<Tensor<B, 2, Int>>,
        cache: Option<&mut KvCache<B>>,
    ) -> Tensor<B, 3> {
        let past = cache.as_ref().map(|c| c.len()).unwrap_or(0);
        let pass = self.padded_pass(input_ids, attention_mask, past);
        self.decode(&pass, cache, None).remove(0)
    }

    /// [`forward_hidden`](Self::forward_hidden) (no cache) keeping only each decoder layer's input
    /// for the backward pass, with the tape that runs it (see [`LayerTape`]).
    pub fn forward_hidden_checkpointed(&self, input_ids: Tensor<B, 2, Int>, attention_mask: Option<Tensor<B, 2, Int>>) -> (Tensor<B, 3>, LayerTape<B>) {
        let (mut hidden, tape) = self.decode_checkpointed(self.padded_pass(input_ids, attention_mask, 0));
        (hidden.remove(0), tape)
    }

    /// The pass of right-padded rows `input_ids` after `past` cached positions.
    fn padded_pass(&self, input_ids: Tensor<B, 2, Int>, attention_mask: Option<Tensor<B, 2, Int>>, past: usize) -> Pass<B> {
        let device = input_ids.device();
        let [batch, len] = input_ids.dims();
        let total = past + len;
        let cfg = &self.config;
        let (cos, sin) = rope::tables::<B>(&cfg.rope, cfg.head_dim, past, len, &device);
        let rotary = self.rotary(cos, sin, 1);

        // The masks are built on the host, one tensor per forward and sliding window that the
        // layers share, written out for every head on the ndarray backend (see `mask_heads`).
        let valid: Option<Vec<i64>> = attention_mask.map(|m| {
            let [mb, ml] = m.dims();
            assert!(
                mb == batch && ml == total,
                "attention_mask has shape [{mb}, {ml}], expected [{batch}, {total}] (cached + new positions)"
            );
            m.into_data().convert::<i64>().to_vec().expect("i64 mask")
        });
        let query_pos = vec![(past..total).collect::<Vec<_>>(); batch];
        let key_pos: Vec<Vec<Option<usize>>> = (0..batch)
            .map(|r| (0..total).map(|k| valid.as_ref().is_none_or(|v| v[r * total + k] != 0).then_some(k)).collect())
            .collect();
        let masks = self.layer_masks(&query_pos, &key_pos, total, &device);
        Pass::whole(Rows { ids: input_ids, rotary, masks })
    }

    /// [`forward_hidden`](Self::forward_hidden) of right-padded rows `[2P, T]` (`lens[r]` real
    /// tokens each) in which rows `p` and `P + p` are a pair, such as a prompt's chosen and rejected
    /// completions: the tokens both rows of a pair begin with (the prompt, at least) go through the
    /// model once, and each row's remaining tokens attend to that shared prefix's keys and values
    /// (prefix sharing, Wang & Hegde 2024, arXiv:2410.20305). A causal model's hidden states of a
    /// prefix do not depend on what follows, so the result equals `forward_hidden` up to float
    /// rounding, gradients included, for fewer positions through every layer. Runs `forward_hidden`
    /// instead when [`prefix_sharing`](Self::prefix_sharing) is off or the padded shapes would not
    /// shrink by 5% (see [`prefix_plan`](Self::prefix_plan)).
    pub fn forward_hidden_pairs(&self, input_ids: &[Vec<u32>], lens: &[usize], device: &B::Device) -> Tensor<B, 3> {
        self.hidden_pairs(input_ids, lens, device, false).0
    }

    /// [`forward_hidden_pairs`](Self::forward_hidden_pairs) keeping only each decoder layer's
    /// input for the backward pass, with the tape that runs it (see [`LayerTape`]).
    pub fn forward_hidden_pairs_checkpointed(&self, input_ids: &[Vec<u32>], lens: &[usize], device: &B::Device) -> (Tensor<B, 3>, LayerTape<B>) {
        let (hidden, tape) = self.hidden_pairs(input_ids, lens, device, true);
        (hidden, tape.expect("a checkpointed pass records its tape"))
    }

    fn hidden_pairs(&self, input_ids: &[Vec<u32>], lens: &[usize], device: &B::Device, checkpoint: bool) -> (Tensor<B, 3>, Option<LayerTape<B>>) {
        let rows = input_ids.len();
        let t = input_ids.first().map_or(0, Vec::len);
        let prefix = self.prefix_plan(input_ids, lens);
        if let Some(pack) = self.pack_plan(lens, t).filter(|pack| prefix.as_ref().is_none_or(|p| pack.positions() < p.positions(rows))) {
            return self.packed_hidden(input_ids, lens, &pack, device, checkpoint);
        }
        let Some(PrefixPlan { shared, prefix_len, suffix_len }) = prefix else {
            let mask: Vec<i64> = lens.iter().flat_map(|&l| (0..t).map(move |i| (i < l) as i64)).collect();
            let mask = Tensor::from_data(TensorData::new(mask, [rows, t]), device);
            let pass = self.padded_pass(ids_tensor(input_ids, device), Some(mask), 0);
            let (mut hidden, tape) = self.run_pass(pass, checkpoint);
            return (hidden.remove(0), tape);
        };
        let pairs = rows / 2;
        let cfg = &self.config;
        let padded = |ids: &[u32], len: usize| {
            let mut v = ids.to_vec();
            v.resize(len, 0);
            v
        };

        // The prefixes `[P, Ls]`, keeping their keys and values.
        let prefix_ids: Vec<Vec<u32>> = (0..pairs).map(|p| padded(&input_ids[p][..shared[p]], prefix_len)).collect();
        let positions: Vec<usize> = (0..prefix_len).collect();
        let (cos, sin) = rope::tables_at::<B>(&cfg.rope, cfg.head_dim, &positions, t, device);
        let query_pos = vec![positions.clone(); pairs];
        let key_pos: Vec<Vec<Option<usize>>> = shared.iter().map(|&s| positions.iter().map(|&k| (k < s).then_some(k)).collect()).collect();
        let prefix = Rows { ids: ids_tensor(&prefix_ids, device), rotary: self.rotary(cos, sin, 1), masks: self.layer_masks(&query_pos, &key_pos, t, device) };

        // Every row's suffix `[2P, Lr]`, after its pair's prefix keys and values.
        let suffix_ids: Vec<Vec<u32>> = (0..rows).map(|r| padded(&input_ids[r][shared[r % pairs]..lens[r]], suffix_len)).collect();
        let query_pos: Vec<Vec<usize>> = (0..rows).map(|r| (shared[r % pairs]..shared[r % pairs] + suffix_len).collect()).collect();
        let key_pos: Vec<Vec<Option<usize>>> = (0..rows)
            .map(|r| {
                let s = shared[r % pairs];
                let prefix = (0..prefix_len).map(|k| (k < s).then_some(k));
                let own = (0..suffix_len).map(|j| (j < lens[r] - s).then_some(s + j));
                prefix.chain(own).collect()
            })
            .collect();
        let rotary = if shared.iter().all(|&s| s == shared[0]) {
            let (cos, sin) = rope::tables_at::<B>(&cfg.rope, cfg.head_dim, &query_pos[0], t, device);
            self.rotary(cos, sin, 1)
        } else {
            let (cos, sin) = rope::tables_at::<B>(&cfg.rope, cfg.head_dim, &query_pos.concat(), t, device);
            self.rotary(cos, sin, rows)
        };
        let suffix = Rows { ids: ids_tensor(&suffix_ids, device), rotary, masks: self.layer_masks(&query_pos, &key_pos, t, device) };
        let (hidden, tape) = self.run_pass(Pass { streams: vec![prefix, suffix], prefixed: true }, checkpoint);
        let [prefix_hidden, suffix_hidden]: [Tensor<B, 3>; 2] = hidden.try_into().unwrap_or_else(|_| unreachable!("two streams in, two out"));

        // Back to the rows' own layout: position `i` of row `r` from the prefix pass or its suffix;
        // padding positions repeat the row's last token (their outputs are never read).
        let h = cfg.hidden_size;
        let both = Tensor::cat(
            vec![prefix_hidden.reshape([pairs * prefix_len, h]), suffix_hidden.reshape([rows * suffix_len, h])],
            0,
        );
        let index: Vec<i64> = (0..rows)
            .flat_map(|r| {
                let (p, s, last) = (r % pairs, shared[r % pairs], lens[r].max(1) - 1);
                (0..t).map(move |i| {
                    let i = i.min(last);
                    if i < s { (p * prefix_len + i) as i64 } else { (pairs * prefix_len + r * suffix_len + i - s) as i64 }
                })
            })
            .collect();
        let index = Tensor::<B, 1, Int>::from_data(TensorData::new(index, [rows * t]), device);
        (both.select(0, index).reshape([rows, t, h]), tape)
    }

    /// `pass` through the model, recorded on a tape when `checkpoint` (see [`LayerTape`]).
    pub(crate) fn run_pass(&self, pass: Pass<B>, checkpoint: bool) -> (Vec<Tensor<B, 3>>, Option<LayerTape<B>>) {
        if checkpoint {
            let (hidden, tape) = self.decode_checkpointed(pass);
            (hidden, Some(tape))
        } else {
            (self.decode(&pass, None, None), None)
        }
    }

    /// How [`forward_hidden_pairs`](Self::forward_hidden_pairs) splits these rows, or `None` when
    /// it runs them whole (sharing off, nothing shared, or under 5% fewer padded positions).
    pub fn prefix_plan(&self, input_ids: &[Vec<u32>], lens: &[usize]) -> Option<PrefixPlan> {
        let rows = input_ids.len();
        assert!(rows.is_multiple_of(2), "paired rows come in pairs, got {rows} rows");
        assert_eq!(lens.len(), rows, "one length per row");
        let t = input_ids.first().map_or(0, Vec::len);
        let pairs = rows / 2;
        let shared = shared_prefixes(input_ids, lens);
        let prefix_len = shared.iter().copied().max().unwrap_or(0);
        let suffix_len = (0..rows).map(|r| lens[r] - shared[r % pairs]).max().unwrap_or(0);
        let saves = worth_rearranging(pairs * prefix_len + rows * suffix_len, rows * t);
        (self.prefix_sharing && prefix_len > 0 && saves).then_some(PrefixPlan { shared, prefix_len, suffix_len })
    }

    /// How [`forward_hidden_pairs`](Self::forward_hidden_pairs) would pack rows of `lens` real
    /// tokens padded to `t`, or `None` when packing is off or would not save 5% of the positions.
    pub fn pack_plan(&self, lens: &[usize], t: usize) -> Option<PackPlan> {
        let plan = PackPlan::new(lens).filter(|_| self.padding_free)?;
        worth_rearranging(plan.positions(), lens.len() * t).then_some(plan)
    }

    /// The rotations for keys and (scaled by `1/sqrt(head_dim)`) queries from f32 `cos`/`sin`
    /// tables, scaled before they are cast to the dtype the projections come out in (so no layer
    /// casts, and keeps for backward, a copy of its own).
    pub(crate) fn rotary(&self, cos: Tensor<B, 2>, sin: Tensor<B, 2>, rows: usize) -> Rotations<B> {
        let key = rope::Rotary::per_row(cos, sin, rows);
        let query = key.scaled((self.config.head_dim as f64).powf(-0.5));
        match self.mixed_precision.compute_dtype() {
            Some(dtype) => Rotations { key: key.cast(dtype), query: query.cast(dtype) },
            None => Rotations { key, query },
        }
    }

    /// Each layer's attention mask for these query and key positions in rows `len` long: one
    /// tensor per distinct sliding window (windows of `len` or more are no window), shared by the
    /// layers that use it (see [`position_mask`]).
    fn layer_masks(&self, query_pos: &[Vec<usize>], key_pos: &[Vec<Option<usize>>], len: usize, device: &B::Device) -> Vec<Tensor<B, 4, Bool>> {
        let heads = mask_heads::<B>(self.config.num_attention_heads, device);
        self.layer_masks_with(len, |window| position_mask(query_pos, key_pos, window, heads, device))
    }

    /// Each layer's mask from `build(window)`, called once per distinct sliding window of the
    /// layers (windows of `len` or more are no window, `None`); layers with the same one share it.
    pub(crate) fn layer_masks_with(&self, len: usize, build: impl Fn(Option<usize>) -> Tensor<B, 4, Bool>) -> Vec<Tensor<B, 4, Bool>> {
        let mut built: Vec<(Option<usize>, Tensor<B, 4, Bool>)> = Vec::new();
        self.layers
            .iter()
            .map(|layer| {
                let window = layer.sliding_window.filter(|w| *w < len);
                if let Some((_, mask)) = built.iter().find(|(w, _)| *w == window) {
                    return mask.clone();
                }
                let mask = build(window);
                built.push((window, mask.clone()));
                mask
            })
            .collect()
    }

    /// Embeddings through every layer and the final norm: each stream's hidden states. A cache
    /// (one stream only) holds earlier positions' keys and values and is extended; a tape
    /// records the pass for its backward pass instead of the autodiff graph (see [`LayerTape`]).
    pub(crate) fn decode(&self, pass: &Pass<B>, mut cache: Option<&mut KvCache<B>>, mut tape: Option<&mut LayerTape<B>>) -> Vec<Tensor<B, 3>> {
        assert!(cache.is_none() || pass.streams.len() == 1, "a KV cache serves a pass of one stream");
        let embed = match tape {
            Some(_) => untracked(self.embed_tokens.val()),
            None => self.embed_tokens.val(),
        };
        let mut xs: Vec<Tensor<B, 3>> = pass.streams.iter().map(|rows| embed_rows(embed.clone(), rows.ids.clone())).collect();
        for (i, layer) in self.layers.iter().enumerate() {
            let slot = cache.as_mut().map(|c| &mut c.layers[i]);
            xs = match tape.as_deref_mut() {
                Some(tape) => tape.record_layer(self, i, xs),
                None => layer.forward_pass(i, xs, pass, slot, self.attention_recompute),
            };
        }
        if let Some(tape) = tape {
            xs = tape.record_outputs(xs);
        }
        xs.into_iter().map(|x| self.norm.forward(x)).collect()
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
    /// `x` `[batch, len, hidden]` through attention and the MLP, each a residual branch after its
    /// norm. The residual stream keeps the parameters' dtype; only the branches compute in half.
    fn forward(&self, x: Tensor<B, 3>, rotary: &Rotations<B>, mask: Tensor<B, 4, Bool>, cache: Option<&mut Option<LayerCache<B>>>, attention_recompute: bool) -> Tensor<B, 3> {
        let attn = self.self_attn.forward(self.input_layernorm.forward(x.clone()), rotary, mask, cache, attention_recompute);
        let dtype = x.dtype();
        let x = x + cast_to(attn, dtype);
        let mlp = self.mlp.forward(self.post_attention_layernorm.forward(x.clone()));
        x + cast_to(mlp, dtype)
    }

    /// This layer, the model's `i`th, on every stream of `pass`: a prefixed pass's suffix rows
    /// attend after their pair's prefix keys and values; with `recompute`, attention keeps no
    /// probabilities for the backward pass.
    pub(crate) fn forward_pass(&self, i: usize, xs: Vec<Tensor<B, 3>>, pass: &Pass<B>, cache: Option<&mut Option<LayerCache<B>>>, recompute: bool) -> Vec<Tensor<B, 3>> {
        if !pass.prefixed {
            let (x, rows) = (xs.into_iter().next().expect("one stream"), &pass.streams[0]);
            return vec![self.forward(x, &rows.rotary, rows.masks[i].clone(), cache, recompute)];
        }
        let [prefix_x, suffix_x]: [Tensor<B, 3>; 2] = xs.try_into().unwrap_or_else(|_| panic!("a prefixed pass has two streams"));
        let (prefix, suffix) = (&pass.streams[0], &pass.streams[1]);
        let mut slot = None;
        let prefix_y = self.forward(prefix_x, &prefix.rotary, prefix.masks[i].clone(), Some(&mut slot), recompute);
        // row p of the prefixes serves rows p and P + p (a pair's chosen and rejected suffixes)
        let kv = slot.expect("attention fills its cache slot");
        let mut slot = Some(LayerCache {
            key: Tensor::cat(vec![kv.key.clone(), kv.key], 0),
            value: Tensor::cat(vec![kv.value.clone(), kv.value], 0),
        });
        let suffix_y = self.forward(suffix_x, &suffix.rotary, suffix.masks[i].clone(), Some(&mut slot), recompute);
        vec![prefix_y, suffix_y]
    }

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

/// How a batch of paired rows runs with prefix sharing: `pairs * prefix_len` positions for the
/// prefixes, then `2 * pairs * suffix_len` for the rows' own tokens (instead of `2 * pairs * T`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrefixPlan {
    /// Tokens pair `p`'s two rows share (see [`shared_prefixes`]).
    pub shared: Vec<usize>,
    /// The longest shared prefix (the prefix pass's padded length).
    pub prefix_len: usize,
    /// The most tokens any row has after its shared prefix (the second pass's padded length).
    pub suffix_len: usize,
}

impl PrefixPlan {
    /// Positions its two passes run for `rows` rows.
    pub fn positions(&self, rows: usize) -> usize {
        rows / 2 * self.prefix_len + rows * self.suffix_len
    }
}

/// Whether running `positions` positions instead of a batch's `whole` padded ones (prefix sharing's
/// two passes, or packed rows) is worth its fixed costs: only if it saves at least 5% of them.
pub fn worth_rearranging(positions: usize, whole: usize) -> bool {
    positions * 20 <= whole * 19
}

/// Per pair of rows `p` and `P + p` (right-padded, `lens` real tokens): how many leading tokens
/// both rows share, leaving each row at least one token of its own.
pub fn shared_prefixes(input_ids: &[Vec<u32>], lens: &[usize]) -> Vec<usize> {
    let pairs = input_ids.len() / 2;
    (0..pairs)
        .map(|p| {
            let (a, b) = (&input_ids[p][..lens[p]], &input_ids[pairs + p][..lens[pairs + p]]);
            let common = a.iter().zip(b).take_while(|(x, y)| x == y).count();
            common.min(lens[p].saturating_sub(1)).min(lens[pairs + p].saturating_sub(1))
        })
        .collect()
}

/// Heads to write attention masks out for: all of them on the ndarray CPU backend, whose `mask_fill`
/// copies a mask broadcast over heads element by element in every call; 1 elsewhere (the flex
/// backend's softmax kernel reads the shared mask row for every head, GPU kernels broadcast for
/// free, and a written-out mask would cost memory: 25 MB per forward pass of 4 rows at T 1024).
pub(crate) fn mask_heads<B: Backend>(heads: usize, device: &B::Device) -> usize {
    if B::name(device).contains("ndarray") { heads } else { 1 }
}

/// Whether `B` is one of burn's CPU backends (flex, ndarray), whose elementwise kernels run on the
/// calling thread and walk strided views element by element.
pub fn is_cpu_backend<B: Backend>(device: &B::Device) -> bool {
    let name = B::name(device);
    name.contains("flex") || name.contains("ndarray")
}

/// `[rows, heads, queries, keys]`, true where a key is hidden from a query: padding keys (`None`),
/// keys at later positions, and with a sliding `window` keys `window` or more positions back. The
/// same for every head (`heads` = 1 leaves the broadcast to attention: see [`mask_heads`]).
fn position_mask<B: Backend>(query_pos: &[Vec<usize>], key_pos: &[Vec<Option<usize>>], window: Option<usize>, heads: usize, device: &B::Device) -> Tensor<B, 4, Bool> {
    let (rows, queries, keys) = (query_pos.len(), query_pos[0].len(), key_pos[0].len());
    let mut hidden = Vec::with_capacity(rows * heads * queries * keys);
    for (qs, ks) in query_pos.iter().zip(key_pos) {
        let start = hidden.len();
        for &q in qs {
            hidden.extend(ks.iter().map(|k| match *k {
                None => true,
                Some(k) => k > q || window.is_some_and(|w| q - k >= w),
            }));
        }
        for _ in 1..heads {
            hidden.extend_from_within(start..start + queries * keys);
        }
    }
    Tensor::from_data(TensorData::new(hidden, [rows, heads, queries, keys]), device)
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

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;

    /// The mask GPU backends get (`[rows, 1, q, k]`, broadcast over heads in attention) hides the
    /// same keys as the one written out for every head on CPU backends.
    #[test]
    fn broadcast_and_written_out_masks_agree() {
        let device = Default::default();
        let query_pos = vec![vec![2, 3, 4], vec![0, 1, 2]];
        let key_pos = vec![vec![Some(0), Some(1), None, Some(3), Some(4)], vec![Some(0), Some(1), Some(2), None, None]];
        let values = |n: usize| Tensor::<Flex, 1, Int>::arange(0..n as i64, &device).float().div_scalar(n as f64).sin();
        let q = values(2 * 3 * 3 * 4).reshape([2, 3, 3, 4]);
        let k = values(2 * 3 * 5 * 4).reshape([2, 3, 5, 4]).mul_scalar(0.5);
        let v = values(2 * 3 * 5 * 4).reshape([2, 3, 5, 4]).cos();
        for window in [None, Some(2)] {
            let full = position_mask::<Flex>(&query_pos, &key_pos, window, 3, &device);
            let one = position_mask::<Flex>(&query_pos, &key_pos, window, 1, &device);
            assert_eq!(full.dims(), [2, 3, 3, 5]);
            assert_eq!(one.clone().expand([2, 3, 3, 5]).into_data(), full.clone().into_data());
            let a = attention(q.clone(), k.clone(), v.clone(), full, false);
            let b = attention(q.clone(), k.clone(), v.clone(), one, false);
            assert_eq!(a.into_data(), b.into_data());
        }
        // key 3 of row 0 (position 3) is hidden from query position 2, visible from 3; the window
        // of 2 hides position 1 from query position 3
        let mask: Vec<bool> = position_mask::<Flex>(&query_pos, &key_pos, Some(2), 1, &device).into_data().to_vec().unwrap();
        assert_eq!(&mask[..5], &[true, false, true, true, true]);
        assert_eq!(&mask[5..10], &[true, true, true, false, true]);
    }
}
