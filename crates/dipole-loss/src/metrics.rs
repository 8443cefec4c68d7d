//! TRL's per-batch metrics, under TRL's names, as host `f64` values.

use std::collections::BTreeMap;

use burn::tensor::{Tensor, backend::Backend};

use crate::objectives::{ObjectiveOutput, PairInputs};
use crate::token_stats::TokenStats;

fn host<B: Backend>(t: Tensor<B, 1>) -> Vec<f64> {
    t.detach().into_data().convert::<f64>().to_vec().expect("f64")
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() { 0.0 } else { v.iter().sum::<f64>() / v.len() as f64 }
}

/// `rewards/*`, `logps/*` from the objective's output, and the token statistics when given.
pub fn preference_metrics<B: Backend>(
    output: &ObjectiveOutput<B>,
    inputs: &PairInputs<B>,
    tokens: Option<&TokenStats>,
) -> BTreeMap<String, f64> {
    let chosen = host(output.chosen_rewards.clone());
    let rejected = host(output.rejected_rewards.clone());
    let accuracies: Vec<f64> = chosen.iter().zip(&rejected).map(|(c, r)| if c > r { 1.0 } else { 0.0 }).collect();
    let margins: Vec<f64> = chosen.iter().zip(&rejected).map(|(c, r)| c - r).collect();
    let mut m = BTreeMap::new();
    m.insert("rewards/chosen".to_string(), mean(&chosen));
    m.insert("rewards/rejected".to_string(), mean(&rejected));
    m.insert("rewards/accuracies".to_string(), mean(&accuracies));
    m.insert("rewards/margins".to_string(), mean(&margins));
    m.insert("logps/chosen".to_string(), mean(&host(inputs.chosen_logps.clone())));
    m.insert("logps/rejected".to_string(), mean(&host(inputs.rejected_logps.clone())));
    for (k, v) in &output.extra {
        m.insert(k.clone(), *v);
    }
    if let Some(t) = tokens {
        m.insert("logits/chosen".to_string(), t.logits_chosen);
        m.insert("logits/rejected".to_string(), t.logits_rejected);
        m.insert("entropy".to_string(), t.entropy);
        m.insert("mean_token_accuracy".to_string(), t.mean_token_accuracy);
    }
    m
}
