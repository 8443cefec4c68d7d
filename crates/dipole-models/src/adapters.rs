//! LoRA on a whole model: attach adapters by HF module name, load and save PEFT folders, merge,
//! freeze. The reference of LoRA DPO is the same weights with adapters disabled, or with a frozen
//! reference adapter (an SFT adapter) switched in: never a second copy of the model.

use std::path::Path;

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::{Tensor, backend::Backend};
use dipole_lora::{AdapterMode, LoraAdapter, LoraConfig, LoraError, LoraLinear, PeftAdapter};

use crate::error::non_finite_count;
use crate::llama::CausalLm;

impl<B: Backend> CausalLm<B> {
    /// Every linear layer with its HF module name (`model.layers.0.self_attn.q_proj`, `lm_head`).
    pub fn linears(&self) -> Vec<(String, &LoraLinear<B>)> {
        let mut out = Vec::new();
        for (i, layer) in self.layers.iter().enumerate() {
            for (name, proj) in layer.named_projections() {
                out.push((format!("model.layers.{i}.{name}"), proj));
            }
        }
        if let Some(head) = &self.lm_head {
            out.push(("lm_head".to_string(), head));
        }
        out
    }

    /// Mutable [`linears`](Self::linears).
    pub fn linears_mut(&mut self) -> Vec<(String, &mut LoraLinear<B>)> {
        const NAMES: [&str; 7] = [
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        ];
        let mut out = Vec::new();
        for (i, layer) in self.layers.iter_mut().enumerate() {
            for (name, proj) in NAMES.iter().zip(layer.projections_mut()) {
                out.push((format!("model.layers.{i}.{name}"), proj));
            }
        }
        if let Some(head) = &mut self.lm_head {
            out.push(("lm_head".to_string(), head));
        }
        out
    }

    /// Attaches fresh adapters (B = 0) to every module `config` targets and freezes the rest of the
    /// model. Returns how many modules were adapted; targeting nothing is an error.
    pub fn add_lora(&mut self, config: &LoraConfig, seed: u64) -> Result<usize, LoraError> {
        config.validate()?;
        let device = self.embed_tokens.device();
        let mut count = 0;
        for (k, (name, linear)) in self.linears_mut().into_iter().enumerate() {
            if config.targets(&name) {
                let module_seed = seed.wrapping_add((k as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
                linear.adapter = Some(LoraAdapter::init(config, linear.in_features(), linear.out_features(), module_seed, &device));
                linear.merged = false;
                count += 1;
            }
        }
        if count == 0 {
            return Err(LoraError::Config(format!(
                "target_modules {:?} matches no linear layer of this model (names look like model.layers.0.self_attn.q_proj)",
                config.target_modules
            )));
        }
        self.freeze_base();
        Ok(count)
    }

    /// Loads a PEFT adapter folder as the trainable adapter; every module it names must exist with
    /// matching sizes.
    pub fn load_adapter(&mut self, dir: &Path) -> Result<LoraConfig, LoraError> {
        let peft = load_finite(dir)?;
        self.attach(&peft, false)?;
        self.freeze_base();
        Ok(peft.config)
    }

    /// Loads a PEFT adapter folder as the frozen reference adapter, used under
    /// [`AdapterMode::Reference`].
    pub fn load_reference_adapter(&mut self, dir: &Path) -> Result<LoraConfig, LoraError> {
        let peft = load_finite(dir)?;
        self.attach(&peft, true)?;
        Ok(peft.config)
    }

    fn attach(&mut self, peft: &PeftAdapter, reference: bool) -> Result<(), LoraError> {
        let device = self.embed_tokens.device();
        let scale = peft.config.scale();
        let mut linears = self.linears_mut();
        for (module, m) in &peft.modules {
            let Some((_, linear)) = linears.iter_mut().find(|(n, _)| n == module) else {
                return Err(LoraError::Mismatch(format!("the adapter has {module:?}, which this model does not")));
            };
            if m.in_features != linear.in_features() || m.out_features != linear.out_features() {
                return Err(LoraError::Mismatch(format!(
                    "{module}: adapter is {}x{} (out x in), the layer is {}x{}",
                    m.out_features,
                    m.in_features,
                    linear.out_features(),
                    linear.in_features()
                )));
            }
            let adapter = LoraAdapter::from_peft(m, scale, peft.config.lora_dropout, &device);
            if reference {
                linear.reference_adapter = Some(adapter.frozen());
            } else {
                linear.adapter = Some(adapter);
                linear.merged = false;
            }
        }
        Ok(())
    }

    /// Writes the trainable adapters as a PEFT folder Python's `peft` loads unchanged.
    pub fn save_adapter(&self, dir: &Path, config: &LoraConfig) -> Result<(), LoraError> {
        let modules = self
            .linears()
            .into_iter()
            .filter_map(|(name, l)| l.adapter.as_ref().map(|a| (name, a.to_peft())))
            .collect();
        PeftAdapter {
            config: config.clone(),
            modules,
        }
        .save(dir)
    }

    /// Folds every adapter into its base weight.
    pub fn merge_adapters(&mut self) {
        self.linears_mut().into_iter().for_each(|(_, l)| l.merge());
    }

    /// Undoes [`merge_adapters`](Self::merge_adapters), up to the rounding of the weights' dtype
    /// (exactly only in f32: a bf16 base merged and unmerged keeps bf16's rounding of the sum).
    pub fn unmerge_adapters(&mut self) {
        self.linears_mut().into_iter().for_each(|(_, l)| l.unmerge());
    }

    /// Merges and drops the adapters: a plain model with the adapted weights.
    pub fn into_merged(mut self) -> Self {
        self.merge_adapters();
        for (_, l) in self.linears_mut() {
            l.adapter = None;
            l.reference_adapter = None;
            l.merged = false;
            l.mode = AdapterMode::Active;
        }
        self
    }

    /// Excludes every base weight (embeddings, norms, projections, head) from gradients; adapters
    /// stay trainable.
    pub fn freeze_base(&mut self) {
        self.set_embeddings_trainable(false);
        self.set_norms_trainable(false);
        for (_, l) in self.linears_mut() {
            l.set_base_trainable(false);
        }
    }

    /// Freezes (or unfreezes) the token embeddings; trainable ones are held in f32 (their master
    /// copy) whatever dtype they were stored in.
    pub fn set_embeddings_trainable(&mut self, trainable: bool) {
        let table = self.embed_tokens.val();
        if trainable && table.dtype() != burn::tensor::DType::F32 {
            self.embed_tokens = Param::initialized(self.embed_tokens.id, table.detach().cast(burn::tensor::DType::F32));
        }
        self.embed_tokens = self.embed_tokens.clone().set_require_grad(trainable);
    }

    pub fn set_norms_trainable(&mut self, trainable: bool) {
        let set = |p: &mut Param<Tensor<B, 1>>| *p = p.clone().set_require_grad(trainable);
        for layer in &mut self.layers {
            set(&mut layer.input_layernorm.weight);
            set(&mut layer.post_attention_layernorm.weight);
        }
        set(&mut self.norm.weight);
    }

    /// Freezes (or unfreezes) the base weights of decoder layer `index`.
    pub fn set_layer_trainable(&mut self, index: usize, trainable: bool) {
        let layer = &mut self.layers[index];
        for proj in layer.projections_mut() {
            proj.set_base_trainable(trainable);
        }
        layer.input_layernorm.weight = layer.input_layernorm.weight.clone().set_require_grad(trainable);
        layer.post_attention_layernorm.weight = layer.post_attention_layernorm.weight.clone().set_require_grad(trainable);
    }

    /// Number of parameters that receive gradients (meaningful on an autodiff backend).
    pub fn num_trainable_params(&self) -> usize {
        trainable_values(self)
    }
}

/// Number of values of `module`'s parameters that receive gradients.
pub(crate) fn trainable_values<B: Backend, M: Module<B>>(module: &M) -> usize {
    struct Count(usize);
    impl<B: Backend> ModuleVisitor<B> for Count {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let t = param.val();
            if t.is_require_grad() {
                self.0 += t.shape().num_elements();
            }
        }
    }
    let mut count = Count(0);
    module.visit(&mut count);
    count.0
}

/// [`PeftAdapter::load`], rejecting NaN or infinite matrices the way a base checkpoint's are
/// rejected (an adapter saved after a diverged run would otherwise train or score as NaN). The
/// values are decoded in dipole-lora, so this is a second pass, but over adapters only, a small
/// fraction of a model.
pub(crate) fn load_finite(dir: &Path) -> Result<PeftAdapter, LoraError> {
    let peft = PeftAdapter::load(dir)?;
    for (module, m) in &peft.modules {
        for (which, values) in [("lora_A", &m.a), ("lora_B", &m.b)] {
            if let Some(index) = values.iter().position(|v| !v.is_finite()) {
                let count = values[index..].iter().filter(|v| !v.is_finite()).count();
                return Err(LoraError::File(
                    dir.join("adapter_model.safetensors"),
                    // PEFT's key for the tensor (a `.default` infix in the file reads the same).
                    format!(
                        "tensor \"base_model.model.{module}.{which}.weight\" has {} (first at element {index}: {})",
                        non_finite_count(count),
                        values[index]
                    ),
                ));
            }
        }
    }
    Ok(peft)
}

impl<B: Backend> CausalLm<B> {
    /// Every float parameter with its HF name (adapters under PEFT's `lora_A`/`lora_B` names),
    /// its id (to find its gradient) and its rank.
    pub fn named_params(&self) -> Vec<(String, burn::module::ParamId, usize)> {
        let mut out = vec![("model.embed_tokens.weight".to_string(), self.embed_tokens.id, 2)];
        for (i, layer) in self.layers.iter().enumerate() {
            out.push((format!("model.layers.{i}.input_layernorm.weight"), layer.input_layernorm.weight.id, 1));
            out.push((format!("model.layers.{i}.post_attention_layernorm.weight"), layer.post_attention_layernorm.weight.id, 1));
        }
        out.push(("model.norm.weight".to_string(), self.norm.weight.id, 1));
        for (name, linear) in self.linears() {
            out.push((format!("{name}.weight"), linear.weight.id, 2));
            if let Some(b) = &linear.bias {
                out.push((format!("{name}.bias"), b.id, 1));
            }
            if let Some(a) = &linear.adapter {
                out.push((format!("{name}.lora_A.weight"), a.a.id, 2));
                out.push((format!("{name}.lora_B.weight"), a.b.id, 2));
            }
        }
        out
    }
}

/// A parameter id derived from its HF name, so optimizer state saved in one process finds its
/// parameters in the next (burn's default ids are random per construction).
fn stable_id(name: &str) -> burn::module::ParamId {
    // FNV-1a, 64 bit.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    burn::module::ParamId::from(h)
}

fn with_id<B: Backend, const D: usize>(p: &mut Param<Tensor<B, D>>, name: &str) {
    let tensor = p.val();
    let trainable = tensor.is_require_grad();
    *p = Param::initialized(stable_id(name), tensor).set_require_grad(trainable);
}

impl<B: Backend> CausalLm<B> {
    /// Gives every parameter an id derived from its HF name (see [`CausalLm::named_params`]).
    pub fn assign_stable_param_ids(&mut self) {
        with_id(&mut self.embed_tokens, "model.embed_tokens.weight");
        for (i, layer) in self.layers.iter_mut().enumerate() {
            with_id(&mut layer.input_layernorm.weight, &format!("model.layers.{i}.input_layernorm.weight"));
            with_id(&mut layer.post_attention_layernorm.weight, &format!("model.layers.{i}.post_attention_layernorm.weight"));
        }
        with_id(&mut self.norm.weight, "model.norm.weight");
        for (name, linear) in self.linears_mut() {
            with_id(&mut linear.weight, &format!("{name}.weight"));
            if let Some(b) = &mut linear.bias {
                with_id(b, &format!("{name}.bias"));
            }
            if let Some(a) = &mut linear.adapter {
                with_id(&mut a.a, &format!("{name}.lora_A.weight"));
                with_id(&mut a.b, &format!("{name}.lora_B.weight"));
            }
        }
    }
}
