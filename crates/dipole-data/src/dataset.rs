//! A preference file turned into model-ready pairs, with what TRL's length rules removed.

use std::path::Path;

use crate::chat::ChatTemplate;
use crate::error::{DataError, Result};
use crate::record::{PreferenceRecord, read_jsonl};
use crate::tokenize::{PairInputs, TokenizedPair, TruncationMode, prepare_pair, tokenize_pair};
use crate::tokenizer::Tokenizer;

#[derive(Clone, Copy, Debug)]
pub struct LengthOptions {
    /// Maximum tokens of prompt + completion; `None` keeps everything.
    pub max_length: Option<usize>,
    pub truncation: TruncationMode,
}

impl Default for LengthOptions {
    fn default() -> Self {
        // TRL's DPOConfig default.
        Self {
            max_length: Some(1024),
            truncation: TruncationMode::KeepStart,
        }
    }
}

#[derive(Clone, Debug)]
pub struct PreparedPairs {
    /// Every record's tokens, in file order.
    pub tokenized: Vec<TokenizedPair>,
    /// The pairs kept, truncated, in file order.
    pub pairs: Vec<PairInputs>,
    /// Record indices removed because the prompt alone reaches `max_length`.
    pub dropped: Vec<usize>,
}

/// Tokenises and length-filters records; a record that cannot be tokenised is an error naming its line.
pub fn prepare_records(
    path: &Path,
    records: &[PreferenceRecord],
    tokenizer: &Tokenizer,
    lengths: LengthOptions,
) -> Result<PreparedPairs> {
    let template = ChatTemplate::from_tokenizer(tokenizer).map_err(|e| DataError::at(&tokenizer.dir, None, e))?;
    let mut out = PreparedPairs {
        tokenized: Vec::with_capacity(records.len()),
        pairs: Vec::with_capacity(records.len()),
        dropped: Vec::new(),
    };
    for record in records {
        let pair = tokenize_pair(tokenizer, template.as_ref(), record)
            .map_err(|reason| DataError::at(path, Some(record.line), reason))?;
        match prepare_pair(&pair, lengths.max_length, lengths.truncation) {
            Some(inputs) => out.pairs.push(inputs),
            None => out.dropped.push(pair.index),
        }
        out.tokenized.push(pair);
    }
    Ok(out)
}

/// Reads a JSONL preference file and prepares it.
pub fn load_pairs(path: &Path, tokenizer: &Tokenizer, lengths: LengthOptions) -> Result<PreparedPairs> {
    let records = read_jsonl(path)?;
    prepare_records(path, &records, tokenizer, lengths)
}
