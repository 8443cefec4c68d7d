//! Where a run's reference log-probs come from (`auto` resolved for the run): a frozen copy of the
//! initial weights (moved towards the policy by TR-DPO), the precomputed cache, the policy with
//! its adapters switched, or none; and the models a run starts from.

use std::collections::BTreeMap;
use std::path::Path;

use burn::module::AutodiffModule;
use burn::tensor::backend::{AutodiffBackend, Backend};
use dipole_data::{PairInputs, PreferenceBatch};
use dipole_lora::AdapterMode;
use dipole_loss::{LossType, ObjectiveConfig};
use dipole_models::{CausalLm, MatrixDtype, ModelConfig};

use crate::error::{TrainError, TrainResult};
use crate::config::{ReferenceStrategy, Stage, TrainConfig};
use crate::evaluate::EvalReference;
use crate::examples::Examples;
use crate::precompute::{CacheInputs, ReferenceCache};
use crate::step::{Reference, batch_shards, reference_logps};


/// The objective a stage trains: SFT is the NLL of the chosen completions.
pub(crate) fn stage_objective(config: &TrainConfig) -> ObjectiveConfig {
    match config.train.stage {
        Stage::Dpo => config.objective.clone(),
        Stage::Sft => ObjectiveConfig {
            loss_type: vec![LossType::Sft],
            loss_weights: Vec::new(),
            ..config.objective.clone()
        },
    }
}

/// Resolves `auto` and checks the strategy fits the run.
pub fn resolve_reference(config: &TrainConfig) -> TrainResult<ReferenceStrategy> {
    let objective = stage_objective(config);
    Ok(match config.train.reference {
        ReferenceStrategy::Auto if objective.reference_free() => ReferenceStrategy::None,
        ReferenceStrategy::Auto if config.lora.enabled && config.lora.reference_adapter.is_some() => ReferenceStrategy::RefAdapter,
        ReferenceStrategy::Auto if config.lora.enabled => ReferenceStrategy::AdapterOff,
        ReferenceStrategy::Auto => ReferenceStrategy::FrozenCopy,
        ReferenceStrategy::Precompute if objective.reference_free() => {
            return Err(TrainError::invalid(format!(
                "train.reference = \"precompute\" but loss_type {:?} (stage {:?}) uses no reference",
                objective.loss_type.iter().map(|t| t.name()).collect::<Vec<_>>(),
                config.train.stage
            )));
        }
        ReferenceStrategy::None if !objective.reference_free() => {
            return Err(TrainError::invalid(format!(
                "train.reference = \"none\" but loss_type {:?} needs reference log-probs",
                objective.loss_type.iter().map(|t| t.name()).collect::<Vec<_>>()
            )));
        }
        other => other,
    })
}

/// Builds the policy the config describes, from the base model or from a checkpoint.
pub(crate) fn build_policy<B: AutodiffBackend>(config: &TrainConfig, checkpoint: Option<&Path>, device: &B::Device) -> TrainResult<CausalLm<B>> {
    let base = &config.model.path;
    let full_weights = match checkpoint {
        Some(dir) if !config.lora.enabled => dir.join("model"),
        _ => base.clone(),
    };
    // a LoRA run's base is frozen: it can stay in its stored dtype; trained weights are f32
    let matrices = if config.lora.enabled { config.model.dtype.matrices() } else { MatrixDtype::F32 };
    let mut model = match checkpoint {
        None => base_model::<B>(config, matrices, device)?,
        Some(_) => CausalLm::<B>::load_with(&full_weights, matrices, device)?.0,
    };
    if config.lora.enabled {
        let lora = config.lora.lora_config(base)?;
        if let Some(dir) = checkpoint {
            model.load_adapter(&dir.join("adapter"))?;
        } else if let Some(init) = &config.lora.init_adapter {
            model.load_adapter(init).map_err(TrainError::key("lora.init_adapter"))?;
        } else {
            check_lora_fits(&lora, &mut model)?;
            model.add_lora(&lora, config.train.seed)?;
        }
        if let Some(reference) = &config.lora.reference_adapter {
            model.load_reference_adapter(reference).map_err(TrainError::key("lora.reference_adapter"))?;
        }
        if config.train.disable_dropout {
            for (_, l) in model.linears_mut() {
                if let Some(a) = &mut l.adapter {
                    a.dropout = 0.0;
                }
            }
        }
    } else {
        model.set_embeddings_trainable(!config.model.freeze_embeddings);
        for &layer in &config.model.freeze_layers {
            if layer >= model.layers.len() {
                return Err(TrainError::invalid(format!("model.freeze_layers: layer {layer} does not exist (the model has {})", model.layers.len())));
            }
            model.set_layer_trainable(layer, false);
        }
    }
    model.assign_stable_param_ids();
    config.train.apply_to(&mut model);
    Ok(model)
}

/// `lora.layers_to_transform` must name layers the model has, and `lora.r` must not exceed the
/// smaller side of any layer it adapts (a rank above it adds parameters and no capacity).
fn check_lora_fits<B: Backend>(lora: &dipole_lora::LoraConfig, model: &mut CausalLm<B>) -> TrainResult<()> {
    let layers = model.layers.len();
    if let Some(bad) = lora.layers_to_transform.iter().flatten().find(|&&l| l >= layers) {
        let valid = if layers == 0 { "none".to_string() } else { format!("0..={}", layers - 1) };
        return Err(TrainError::invalid(format!("lora.layers_to_transform: layer {bad} does not exist (the model has {layers}: {valid})")));
    }
    for (name, linear) in model.linears_mut() {
        let side = linear.in_features().min(linear.out_features());
        if lora.targets(&name) && lora.r > side {
            return Err(TrainError::invalid(format!(
                "lora.r = {} is larger than {name} ({} -> {} features): the rank can be at most {side}",
                lora.r,
                linear.in_features(),
                linear.out_features()
            )));
        }
    }
    Ok(())
}

/// TR-DPO's soft update: `alpha * policy + (1 - alpha) * reference`, weight by weight, the
/// reference's matrices held in `matrices` as before.
fn mix_models<B: Backend>(policy: &CausalLm<B>, reference: &CausalLm<B>, alpha: f64, matrices: MatrixDtype) -> TrainResult<CausalLm<B>> {
    struct Mix(BTreeMap<String, Vec<f32>>);
    impl dipole_models::WeightSource for Mix {
        fn tensor(&mut self, name: &str, shape: &[usize], _kind: dipole_models::ParamKind) -> dipole_models::Result<Vec<f32>> {
            let v = self.0.remove(name).unwrap_or_else(|| panic!("{name}: both models have the same tensors"));
            assert_eq!(v.len(), shape.iter().product::<usize>(), "{name}");
            Ok(v)
        }
    }
    let reference_tensors: BTreeMap<String, Vec<f32>> = reference.hf_tensors().into_iter().map(|(n, _, v)| (n, v)).collect();
    let mut mixed = BTreeMap::new();
    for (name, _, p) in policy.hf_tensors() {
        let r = &reference_tensors[&name];
        let (a, b) = (alpha as f32, (1.0 - alpha) as f32);
        mixed.insert(name, p.iter().zip(r).map(|(p, r)| a * p + b * r).collect());
    }
    let device = reference.embed_tokens.device();
    let mut model = CausalLm::from_source_with(reference.config.clone(), &mut Mix(mixed), matrices, &device)?;
    model.set_mixed_precision(reference.mixed_precision);
    model.prefix_sharing = reference.prefix_sharing;
    model.padding_free = reference.padding_free;
    model.attention_recompute = reference.attention_recompute;
    model.fused_head = reference.fused_head;
    Ok(model)
}

/// The starting weights: the model folder's with its matrices in `matrices`, or seeded random
/// ones in f32 (`model.from_scratch`).
pub(crate) fn base_model<B: Backend>(config: &TrainConfig, matrices: MatrixDtype, device: &B::Device) -> TrainResult<CausalLm<B>> {
    let mut model = if config.model.from_scratch {
        let model_config = ModelConfig::from_dir(&config.model.path)?;
        CausalLm::init(model_config, config.train.seed, device)
    } else {
        CausalLm::<B>::load_with(&config.model.path, matrices, device)?.0
    };
    config.train.apply_to(&mut model);
    Ok(model)
}

/// A run's reference, set up once: what `for_batch` hands each step.
pub(crate) struct References<B: AutodiffBackend> {
    strategy: ReferenceStrategy,
    /// `frozen-copy`: the initial weights, or where TR-DPO has moved them.
    frozen: Option<CausalLm<B::InnerBackend>>,
    /// `precompute`: training pairs' values, then eval pairs'.
    precomputed: Option<ReferenceCache>,
    train_len: usize,
    /// How the frozen copy holds its matrices (`model.dtype`).
    frozen_matrices: MatrixDtype,
}

impl<B: AutodiffBackend> References<B> {
    /// The reference of `config`'s run; `checkpoint` holds TR-DPO's moved reference on resume.
    pub(crate) fn new(config: &TrainConfig, strategy: ReferenceStrategy, checkpoint: Option<&Path>, sets: (&Examples, &Examples), pad: u32, device: &B::Device) -> TrainResult<Self> {
        if config.train.sync_ref_model && strategy != ReferenceStrategy::FrozenCopy {
            return Err(TrainError::invalid(format!("train.sync_ref_model (TR-DPO) needs train.reference = \"frozen-copy\", not {strategy:?}")));
        }
        let frozen_matrices = config.model.dtype.matrices();
        let frozen = match (strategy, checkpoint) {
            // TR-DPO's reference moves: a checkpoint holds the one it had reached.
            (ReferenceStrategy::FrozenCopy, Some(dir)) if config.train.sync_ref_model => {
                let mut reference = CausalLm::<B::InnerBackend>::load_with(dir.join("reference"), frozen_matrices, device)?.0;
                config.train.apply_to(&mut reference);
                Some(reference)
            }
            (ReferenceStrategy::FrozenCopy, _) => Some(base_model::<B::InnerBackend>(config, frozen_matrices, device)?),
            _ => None,
        };
        let precomputed = match (strategy, sets) {
            (ReferenceStrategy::Precompute, (Examples::Pairs(train, _), Examples::Pairs(eval, _))) => Some(precompute::<B>(config, train, eval, pad, device)?),
            _ => None,
        };
        Ok(Self { strategy, frozen, precomputed, train_len: sets.0.len(), frozen_matrices })
    }

    /// The reference for the examples at `indices` of the training set, or of the eval set.
    pub(crate) fn for_batch(&self, indices: &[usize], eval: bool) -> Reference<B> {
        match self.strategy {
            ReferenceStrategy::Precompute => {
                let cache = self.precomputed.as_ref().expect("computed in new");
                let offset = if eval { self.train_len } else { 0 };
                Reference::Precomputed(indices.iter().map(|&i| cache.values[offset + i]).collect())
            }
            ReferenceStrategy::FrozenCopy => Reference::Model(self.frozen.clone().expect("loaded in new")),
            ReferenceStrategy::AdapterOff => Reference::Policy(AdapterMode::Disabled),
            ReferenceStrategy::RefAdapter => Reference::Policy(AdapterMode::Reference),
            ReferenceStrategy::None => Reference::None,
            ReferenceStrategy::Auto => unreachable!("resolved before"),
        }
    }

    /// TR-DPO's sync: the frozen reference becomes `alpha * policy + (1 - alpha) * reference`.
    pub(crate) fn sync(&mut self, policy: &CausalLm<B>, alpha: f64) -> TrainResult<()> {
        let frozen = self.frozen.as_ref().expect("TR-DPO runs on frozen-copy (checked in new)");
        self.frozen = Some(mix_models(&policy.valid(), frozen, alpha, self.frozen_matrices)?);
        Ok(())
    }

    /// The eval set's reference next to `policy` (the policy's no-autodiff copy): a model to run,
    /// the precomputed values of the eval pairs, or none.
    pub(crate) fn for_eval(&self, policy: &CausalLm<B::InnerBackend>) -> EvalReference<'_, B::InnerBackend> {
        let with_adapters = |mode| {
            let mut model = policy.clone();
            model.set_adapter_mode(mode);
            EvalReference::Model(Box::new(model))
        };
        match self.strategy {
            ReferenceStrategy::Precompute => EvalReference::Values(&self.precomputed.as_ref().expect("computed in new").values[self.train_len..]),
            ReferenceStrategy::FrozenCopy => EvalReference::Model(Box::new(self.frozen.clone().expect("loaded in new"))),
            ReferenceStrategy::AdapterOff => with_adapters(AdapterMode::Disabled),
            ReferenceStrategy::RefAdapter => with_adapters(AdapterMode::Reference),
            ReferenceStrategy::None => EvalReference::None,
            ReferenceStrategy::Auto => unreachable!("resolved before"),
        }
    }

    /// The frozen reference model, when the run has one.
    pub(crate) fn frozen(&self) -> Option<&CausalLm<B::InnerBackend>> {
        self.frozen.as_ref()
    }
}

/// The reference log-probs of a precomputed run (the initial policy with adapters off, or base +
/// reference adapter), from the cache when it holds them for exactly these inputs.
fn precompute<B: AutodiffBackend>(config: &TrainConfig, train: &[PairInputs], eval: &[PairInputs], pad: u32, device: &B::Device) -> TrainResult<ReferenceCache> {
    let dir = config.train.cache_dir.clone().unwrap_or_else(|| config.train.output_dir.join("reference-cache"));
    let inputs = CacheInputs::of(config, train, eval, Some(&dir))?;
    let ld_alpha = stage_objective(config).ld_alpha;
    ReferenceCache::load_or_compute(&dir, &inputs, || {
        let initial = build_policy::<B>(config, None, device)?;
        let mode = if config.lora.reference_adapter.is_some() { AdapterMode::Reference } else { AdapterMode::Disabled };
        let all: Vec<PairInputs> = train.iter().chain(eval).cloned().collect();
        let mut values = Vec::with_capacity(all.len());
        for chunk in all.chunks(config.train.batch_size) {
            let batch = PreferenceBatch::new(chunk, pad);
            let shards = batch_shards::<B>(config.train.batch_shards, batch.num_pairs(), device);
            let r = reference_logps(&initial, Reference::Policy(mode), &batch, ld_alpha, shards, device).expect("a policy reference gives values");
            values.extend(r);
        }
        Ok(values)
    })
}
