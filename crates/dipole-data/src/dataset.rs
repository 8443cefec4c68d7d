//! A preference dataset turned into model-ready pairs, with what validation skipped and what TRL's
//! length rules removed, both counted and reported.

use std::path::Path;

use crate::chat::ChatTemplate;
use crate::error::{DataError, Result};
use crate::record::{PreferenceRecord, ReadOptions, no_valid_records, read_preferences};
use crate::tokenize::{PairInputs, TokenizedPair, TruncationMode, prepare_pair_with_prompt_limit, tokenize_pair};
use crate::tokenizer::Tokenizer;

#[derive(Clone, Copy, Debug)]
pub struct LengthOptions {
    /// Maximum tokens of prompt + completion; `None` keeps everything.
    pub max_length: Option<usize>,
    pub truncation: TruncationMode,
    /// Cut prompts to their last N tokens before `max_length` applies (off by default, as in TRL 1.16).
    pub max_prompt_length: Option<usize>,
}

impl Default for LengthOptions {
    fn default() -> Self {
        // TRL's DPOConfig default.
        Self {
            max_length: Some(1024),
            truncation: TruncationMode::KeepStart,
            max_prompt_length: None,
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct PreparedPairs {
    /// Every valid record's tokens, in dataset order (`tokenized[i].index == i`).
    pub tokenized: Vec<TokenizedPair>,
    /// The pairs kept, truncated, in dataset order.
    pub pairs: Vec<PairInputs>,
    /// Record indices removed because the prompt alone reaches `max_length`.
    pub dropped: Vec<usize>,
    /// Rows skipped as invalid (only with `skip_invalid`), each with file, location and reason.
    pub skipped: Vec<DataError>,
    /// Pairs whose prompt + completion was cut to `max_length`.
    pub truncated: usize,
}

/// Tokenises and length-filters records. A record that cannot be tokenised is an error naming its
/// file and line, or, with `skip_invalid`, a reported skip; when none can be, that is an error.
pub fn prepare_records(
    records: &[PreferenceRecord],
    tokenizer: &Tokenizer,
    lengths: LengthOptions,
    skip_invalid: bool,
) -> Result<PreparedPairs> {
    let out = tokenize_records(records, tokenizer, lengths, skip_invalid)?;
    if out.tokenized.is_empty() && !out.skipped.is_empty() {
        // the records' file, or the folder of their shards
        let first = &records[0].path;
        let path = if records.iter().all(|r| r.path == *first) { first.clone() } else { first.parent().unwrap_or(first).to_path_buf() };
        return Err(no_valid_records(&path, &out.skipped));
    }
    Ok(out)
}

fn tokenize_records(
    records: &[PreferenceRecord],
    tokenizer: &Tokenizer,
    lengths: LengthOptions,
    skip_invalid: bool,
) -> Result<PreparedPairs> {
    let template = ChatTemplate::from_tokenizer(tokenizer).map_err(|e| DataError::at(&tokenizer.dir, None, e.to_string()))?;
    let mut out = PreparedPairs::default();
    for record in records {
        let pair = match tokenize_pair(tokenizer, template.as_ref(), record) {
            Ok(mut pair) => {
                pair.index = out.tokenized.len();
                pair
            }
            Err(reason) => {
                let err = DataError::located(&record.path, Some(record.location), reason);
                if skip_invalid {
                    out.skipped.push(err);
                    continue;
                }
                return Err(err);
            }
        };
        match prepare_pair_with_prompt_limit(&pair, lengths.max_prompt_length, lengths.max_length, lengths.truncation) {
            Some(inputs) => {
                let prompt = lengths.max_prompt_length.map_or(pair.prompt_ids.len(), |m| pair.prompt_ids.len().min(m));
                let full = prompt + pair.chosen_ids.len().max(pair.rejected_ids.len());
                if lengths.max_length.is_some_and(|m| full > m) {
                    out.truncated += 1;
                }
                out.pairs.push(inputs)
            }
            None => out.dropped.push(pair.index),
        }
        out.tokenized.push(pair);
    }
    Ok(out)
}

/// Reads a preference dataset (JSONL, JSON, Parquet, or a folder of them) and prepares it; the first
/// bad row is an error naming its file and line.
pub fn load_pairs(path: &Path, tokenizer: &Tokenizer, lengths: LengthOptions) -> Result<PreparedPairs> {
    load_pairs_with(path, tokenizer, lengths, ReadOptions::default())
}

/// [`load_pairs`] with read options (format, `skip_invalid`).
pub fn load_pairs_with(path: &Path, tokenizer: &Tokenizer, lengths: LengthOptions, options: ReadOptions) -> Result<PreparedPairs> {
    let (records, skipped) = read_preferences(path, options)?;
    let mut prepared = tokenize_records(&records, tokenizer, lengths, options.skip_invalid)?;
    let mut all = skipped;
    all.append(&mut prepared.skipped);
    prepared.skipped = all;
    if prepared.tokenized.is_empty() {
        // read_preferences gave records, so every one was skipped at tokenisation
        return Err(no_valid_records(path, &prepared.skipped));
    }
    Ok(prepared)
}
