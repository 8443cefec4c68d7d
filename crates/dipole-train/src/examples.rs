//! A stage's examples, read and tokenised as TRL does: preference pairs, KTO's unpaired rows with
//! their KL sequences, or SFT's prompt + completion rows; held out for evaluation by file or by a
//! seeded fraction.

use std::path::Path;

use dipole_data::{
    CompletionInputs, LengthOptions, PairInputs, PairsAs, ReadOptions, Tokenizer, kto_pairs, load_completions_with, load_pairs_with,
};
use dipole_loss::ObjectiveConfig;

use crate::error::{TrainError, TrainResult};
use crate::config::{Stage, TrainConfig};

/// A stage's examples: preference pairs, or single prompt + completion sequences (SFT).
pub(crate) enum Examples {
    /// Preference pairs; for KTO, unpaired examples with their KL sequences and desirable flags.
    Pairs(Vec<PairInputs>, Option<Vec<bool>>),
    Sequences(Vec<CompletionInputs>),
}

impl Examples {
    pub(crate) fn len(&self) -> usize {
        match self {
            Examples::Pairs(p, _) => p.len(),
            Examples::Sequences(s) => s.len(),
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// BLAKE3 of the examples as tokenised: ids and masks of every row, labels, in order.
    pub(crate) fn digest(&self) -> String {
        let mut h = blake3::Hasher::new();
        h.update(&(self.len() as u64).to_le_bytes());
        match self {
            Examples::Pairs(pairs, labels) => {
                for p in pairs {
                    crate::precompute::hash_sequence(&mut h, &p.chosen);
                    crate::precompute::hash_sequence(&mut h, &p.rejected);
                }
                for &l in labels.iter().flatten() {
                    h.update(&[l as u8]);
                }
            }
            Examples::Sequences(seqs) => {
                for s in seqs {
                    crate::precompute::hash_sequence(&mut h, &s.sequence);
                    h.update(&[s.label.map_or(2, |l| l as u8)]);
                }
            }
        }
        h.finalize().to_hex().to_string()
    }

    /// Longest row of example `i` (length-grouped batching).
    pub(crate) fn row_len(&self, i: usize) -> usize {
        match self {
            Examples::Pairs(p, _) => p[i].chosen.input_ids.len().max(p[i].rejected.input_ids.len()),
            Examples::Sequences(s) => s[i].sequence.input_ids.len(),
        }
    }

    /// Example `i`'s prompt length and its longest row's length.
    pub(crate) fn lengths(&self, i: usize) -> (usize, usize) {
        match self {
            Examples::Pairs(p, _) => (p[i].chosen.prompt_len(), self.row_len(i)),
            Examples::Sequences(s) => (s[i].sequence.prompt_len(), self.row_len(i)),
        }
    }

    /// The prompt tokens of example `i` and its record index (generations).
    pub(crate) fn prompt(&self, i: usize) -> (usize, Vec<u32>) {
        let (index, seq) = match self {
            Examples::Pairs(p, _) => (p[i].index, &p[i].chosen),
            Examples::Sequences(s) => (s[i].index, &s[i].sequence),
        };
        (index, seq.input_ids[..seq.prompt_len()].to_vec())
    }
}

/// The training and eval examples of `config`'s stage, tokenised by `tokenizer`; skipped and
/// dropped rows are reported on stderr.
pub(crate) fn load(config: &TrainConfig, objective: &ObjectiveConfig, tokenizer: &Tokenizer) -> TrainResult<(Examples, Examples)> {
    let lengths = LengthOptions {
        max_length: Some(config.data.max_length),
        truncation: config.data.truncation,
        max_prompt_length: config.data.max_prompt_length,
    };
    let read = ReadOptions { format: None, skip_invalid: config.data.skip_invalid };
    // SFT and KTO read prompt + completion examples (pairs give their chosen side, or both sides).
    let completion_sets = |pairs_as: PairsAs| -> TrainResult<(Vec<CompletionInputs>, Vec<CompletionInputs>)> {
        let load = |path: &Path| load_completions_with(path, tokenizer, lengths, read, pairs_as);
        let prepared = load(&config.data.train)?;
        report_skipped_and_dropped(config, &prepared.skipped, &prepared.dropped, prepared.examples.len() + prepared.dropped.len());
        Ok(match &config.data.eval {
            Some(path) => (prepared.examples, load(path)?.examples),
            None => split_pairs(prepared.examples, config.data.eval_fraction, config.train.seed),
        })
    };
    let (train, eval) = if config.train.stage == Stage::Sft {
        let (train, eval) = completion_sets(PairsAs::Chosen)?;
        (Examples::Sequences(train), Examples::Sequences(eval))
    } else if objective.loss_type.iter().any(|t| t.unpaired()) {
        // KTO: each example with a mismatched KL sequence fixed by dataset order.
        let (train, eval) = completion_sets(PairsAs::Unpaired)?;
        let with_kl = |examples: &[CompletionInputs]| {
            kto_pairs(examples, config.train.batch_size, lengths.max_length, lengths.truncation)
        };
        let ((train, train_labels), (eval, eval_labels)) = (with_kl(&train)?, with_kl(&eval)?);
        (Examples::Pairs(train, Some(train_labels)), Examples::Pairs(eval, Some(eval_labels)))
    } else {
        let prepared = load_pairs_with(&config.data.train, tokenizer, lengths, read)?;
        report_skipped_and_dropped(config, &prepared.skipped, &prepared.dropped, prepared.tokenized.len());
        let (train, eval) = match &config.data.eval {
            Some(path) => (prepared.pairs, load_pairs_with(path, tokenizer, lengths, read)?.pairs),
            None => split_pairs(prepared.pairs, config.data.eval_fraction, config.train.seed),
        };
        (Examples::Pairs(train, None), Examples::Pairs(eval, None))
    };
    if train.is_empty() {
        return Err(TrainError::Run(format!("{}: no training examples left after length filtering", config.data.train.display())));
    }
    Ok((train, eval))
}

/// Holds out `fraction` of the examples (seeded) for evaluation.
pub fn split_pairs<T>(pairs: Vec<T>, fraction: f64, seed: u64) -> (Vec<T>, Vec<T>) {
    let (_, test) = dipole_data::split::split_indices(pairs.len(), fraction, seed);
    let test: std::collections::BTreeSet<usize> = test.into_iter().collect();
    let (mut train, mut eval) = (Vec::new(), Vec::new());
    for (i, p) in pairs.into_iter().enumerate() {
        if test.contains(&i) { eval.push(p) } else { train.push(p) }
    }
    (train, eval)
}

fn report_skipped_and_dropped(config: &TrainConfig, skipped: &[dipole_data::DataError], dropped: &[usize], total: usize) {
    if !skipped.is_empty() {
        tracing::warn!("{} invalid training rows skipped:", skipped.len());
        for e in skipped {
            tracing::warn!("  {e}");
        }
    }
    if !dropped.is_empty() {
        tracing::warn!(
            "{} of {total} training records dropped: prompt alone reaches max_length {} (records {dropped:?})",
            dropped.len(),
            config.data.max_length,
        );
    }
}

/// Non-padding tokens of a batch's rows.
pub(crate) fn mask_tokens(mask: &[Vec<u8>]) -> u64 {
    mask.iter().flatten().map(|&m| m as u64).sum()
}

