//! Prompt + completion examples (SFT, and KTO's unpaired desirable/undesirable rows): read, tokenised
//! with the same TRL rules as pairs, length-filtered, and batched.

use std::path::Path;

use crate::chat::ChatTemplate;
use crate::dataset::LengthOptions;
use crate::error::{DataError, Location, Result};
use crate::record::{Content, ReadOptions, no_valid_records, read_rows};
use crate::tokenize::{Sequence, build_sequence, limit_prompt, tokenize_completion};
use crate::tokenizer::Tokenizer;

/// How preference pairs are read when a completion dataset is asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PairsAs {
    /// The chosen completion only (SFT on preference data).
    Chosen,
    /// Two unpaired rows per pair: chosen desirable, rejected undesirable (TRL's
    /// `unpair_preference_dataset`, for KTO).
    Unpaired,
}

/// One prompt + completion ready for the model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CompletionInputs {
    /// Position among the dataset's examples (after unpairing).
    pub index: usize,
    pub sequence: Sequence,
    /// KTO's desirable (`true`) / undesirable (`false`); `None` for plain SFT rows.
    pub label: Option<bool>,
    /// Where the row came from, for error messages.
    pub source: (std::path::PathBuf, Location),
}

#[derive(Clone, Debug, Default)]
pub struct PreparedCompletions {
    pub examples: Vec<CompletionInputs>,
    /// Example indices removed because the prompt alone reaches `max_length`.
    pub dropped: Vec<usize>,
    /// Rows skipped as invalid (only with `skip_invalid`).
    pub skipped: Vec<DataError>,
    /// Examples cut to `max_length`.
    pub truncated: usize,
}

/// Reads prompt-completion rows (`{prompt, completion[, label]}`), or preference pairs read as
/// `pairs`, tokenises them as TRL does and applies the length rules.
pub fn load_completions_with(
    path: &Path,
    tokenizer: &Tokenizer,
    lengths: LengthOptions,
    options: ReadOptions,
    pairs: PairsAs,
) -> Result<PreparedCompletions> {
    let rows = read_rows(path, options)?;
    let template = ChatTemplate::from_tokenizer(tokenizer).map_err(|e| DataError::at(&tokenizer.dir, None, e.to_string()))?;
    let mut items: Vec<(&Path, Location, &Content, &Content, Option<bool>)> = Vec::new();
    for r in &rows.unpaired {
        items.push((&r.path, r.location, &r.prompt, &r.completion, r.label));
    }
    for r in &rows.preference {
        items.push((&r.path, r.location, &r.prompt, &r.chosen, Some(true)));
        if pairs == PairsAs::Unpaired {
            items.push((&r.path, r.location, &r.prompt, &r.rejected, Some(false)));
        }
    }
    let mut out = PreparedCompletions { skipped: rows.skipped, ..Default::default() };
    for (file, location, prompt, completion, label) in items {
        let (prompt_ids, completion_ids) = match tokenize_completion(tokenizer, template.as_ref(), prompt, completion) {
            Ok(ids) => ids,
            Err(reason) => {
                let err = DataError::located(file, Some(location), reason);
                if options.skip_invalid {
                    out.skipped.push(err);
                    continue;
                }
                return Err(err);
            }
        };
        let index = out.examples.len() + out.dropped.len();
        let Some(prompt_ids) = limit_prompt(&prompt_ids, lengths.max_prompt_length, lengths.max_length) else {
            out.dropped.push(index);
            continue;
        };
        if lengths.max_length.is_some_and(|m| prompt_ids.len() + completion_ids.len() > m) {
            out.truncated += 1;
        }
        let sequence = build_sequence(prompt_ids, &completion_ids, lengths.max_length, lengths.truncation);
        out.examples.push(CompletionInputs { index, sequence, label, source: (file.to_path_buf(), location) });
    }
    // read_rows gave rows, so none left means every one was skipped at tokenisation
    if out.examples.is_empty() && out.dropped.is_empty() {
        return Err(no_valid_records(path, &out.skipped));
    }
    Ok(out)
}

/// KTO's unpaired examples as pairs: each example (the `chosen` side) with its KL sequence (the
/// `rejected` side): its own prompt followed by the completion of the previous example of its chunk
/// of `chunk` examples in dataset order (TRL rotates completions by one within each batch), cut to
/// `max_length`. Returns the pairs and the examples' desirable flags; every example needs a label.
pub fn kto_pairs(
    examples: &[CompletionInputs],
    chunk: usize,
    max_length: Option<usize>,
    mode: crate::tokenize::TruncationMode,
) -> Result<(Vec<crate::tokenize::PairInputs>, Vec<bool>)> {
    let mut pairs = Vec::with_capacity(examples.len());
    let mut labels = Vec::with_capacity(examples.len());
    for (k, e) in examples.iter().enumerate() {
        let label = e.label.ok_or_else(|| {
            DataError::located(&e.source.0, Some(e.source.1), "missing field \"label\" (true for desirable, false for undesirable): KTO needs one on every row")
        })?;
        let start = k - k % chunk.max(1);
        let end = (start + chunk.max(1)).min(examples.len());
        let partner = if k == start { end - 1 } else { k - 1 };
        let prompt = &e.sequence.input_ids[..e.sequence.prompt_len()];
        let other = &examples[partner].sequence;
        let kl = build_sequence(prompt, &other.input_ids[other.prompt_len()..], max_length, mode);
        pairs.push(crate::tokenize::PairInputs { index: e.index, chosen: e.sequence.clone(), rejected: kl });
        labels.push(label);
    }
    Ok((pairs, labels))
}

/// A right-padded batch of single sequences.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SequenceBatch {
    pub indices: Vec<usize>,
    pub input_ids: Vec<Vec<u32>>,
    pub attention_mask: Vec<Vec<u8>>,
    pub completion_mask: Vec<Vec<u8>>,
    pub labels: Vec<Option<bool>>,
    pub seq_len: usize,
}

impl SequenceBatch {
    pub fn new(examples: &[&CompletionInputs], pad_id: u32) -> Self {
        let rows: Vec<&Sequence> = examples.iter().map(|e| &e.sequence).collect();
        let (input_ids, attention_mask, completion_mask, seq_len) = crate::batch::pad_rows(&rows, pad_id);
        Self {
            indices: examples.iter().map(|e| e.index).collect(),
            input_ids,
            attention_mask,
            completion_mask,
            labels: examples.iter().map(|e| e.label).collect(),
            seq_len,
        }
    }

    pub fn len(&self) -> usize {
        self.indices.len()
    }

    pub fn is_empty(&self) -> bool {
        self.indices.is_empty()
    }

    /// The rows `rows` of this batch as a batch of their own, with the padding that none of them
    /// needs cut off.
    pub fn shard(&self, rows: std::ops::Range<usize>) -> Self {
        assert!(rows.start < rows.end && rows.end <= self.len(), "shard {rows:?} of a batch of {} rows", self.len());
        let seq_len = crate::batch::used_len(&self.attention_mask[rows.clone()]);
        let cut = |m: &[Vec<u8>]| -> Vec<Vec<u8>> { m.iter().map(|r| r[..seq_len].to_vec()).collect() };
        Self {
            indices: self.indices[rows.clone()].to_vec(),
            input_ids: self.input_ids[rows.clone()].iter().map(|r| r[..seq_len].to_vec()).collect(),
            attention_mask: cut(&self.attention_mask[rows.clone()]),
            completion_mask: cut(&self.completion_mask[rows.clone()]),
            labels: self.labels[rows].to_vec(),
            seq_len,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenize::TruncationMode;

    fn tokenizer() -> Tokenizer {
        Tokenizer::from_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/tiny-llama")).unwrap()
    }

    #[test]
    fn completion_rows_tokenise_like_pairs() {
        let dir = tempfile::tempdir().unwrap();
        let pairs = dir.path().join("p.jsonl");
        std::fs::write(&pairs, "{\"prompt\": \"Q: sky?\\nA:\", \"chosen\": \" blue.\", \"rejected\": \" red, I think.\"}\n").unwrap();
        let rows = dir.path().join("c.jsonl");
        std::fs::write(
            &rows,
            "{\"prompt\": \"Q: sky?\\nA:\", \"completion\": \" blue.\"}\n{\"prompt\": \"Q: sky?\\nA:\", \"completion\": \" red, I think.\", \"label\": false}\n",
        )
        .unwrap();
        let tok = tokenizer();
        let lengths = LengthOptions { max_length: Some(128), truncation: TruncationMode::KeepStart, ..Default::default() };
        let pair = &crate::load_pairs(&pairs, &tok, lengths).unwrap().pairs[0];
        let unpaired = load_completions_with(&pairs, &tok, lengths, ReadOptions::default(), PairsAs::Unpaired).unwrap();
        assert_eq!(unpaired.examples.len(), 2);
        assert_eq!(unpaired.examples[0].sequence, pair.chosen);
        assert_eq!(unpaired.examples[1].sequence, pair.rejected);
        assert_eq!((unpaired.examples[0].label, unpaired.examples[1].label), (Some(true), Some(false)));
        let plain = load_completions_with(&rows, &tok, lengths, ReadOptions::default(), PairsAs::Chosen).unwrap();
        assert_eq!(plain.examples[0].sequence, pair.chosen);
        assert_eq!(plain.examples[1].sequence, pair.rejected);
        assert_eq!((plain.examples[0].label, plain.examples[1].label), (None, Some(false)));

        let batch = SequenceBatch::new(&plain.examples.iter().collect::<Vec<_>>(), 0);
        assert_eq!(batch.seq_len, pair.rejected.input_ids.len().max(pair.chosen.input_ids.len()));
        assert!(batch.input_ids.iter().all(|r| r.len() == batch.seq_len));
        for row in 0..2 {
            let alone = SequenceBatch::new(&[&plain.examples[row]], 0);
            assert_eq!(batch.shard(row..row + 1), alone, "row {row} as a shard: its own padding only");
        }
    }

    #[test]
    fn kto_pairs_rotate_completions_within_chunks() {
        let seq = |prompt: &[u32], completion: &[u32]| Sequence {
            input_ids: prompt.iter().chain(completion).copied().collect(),
            completion_mask: prompt.iter().map(|_| 0).chain(completion.iter().map(|_| 1)).collect(),
        };
        let ex = |i: usize, p: u32, c: u32, label: Option<bool>| CompletionInputs {
            index: i,
            sequence: seq(&[1, p], &[c, c]),
            label,
            source: (std::path::PathBuf::from("k.jsonl"), Location::Line(i + 1)),
        };
        let examples = vec![ex(0, 10, 20, Some(true)), ex(1, 11, 21, Some(false)), ex(2, 12, 22, Some(true)), ex(3, 13, 23, Some(true)), ex(4, 14, 24, Some(false))];
        let (pairs, labels) = kto_pairs(&examples, 2, None, TruncationMode::KeepStart).unwrap();
        assert_eq!(labels, vec![true, false, true, true, false]);
        let kl_completion: Vec<u32> = pairs.iter().map(|p| p.rejected.input_ids[2]).collect();
        assert_eq!(kl_completion, vec![21, 20, 23, 22, 24], "chunks [0,1] [2,3] [4]");
        assert_eq!(pairs[0].rejected.input_ids[..2], [1, 10], "the example's own prompt");
        let mut unlabelled = examples.clone();
        unlabelled[3].label = None;
        let err = kto_pairs(&unlabelled, 2, None, TruncationMode::KeepStart).unwrap_err().to_string();
        assert!(err.contains("k.jsonl:4") && err.contains("label"), "{err}");
    }

    #[test]
    fn prompt_reaching_max_length_is_dropped_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let rows = dir.path().join("c.jsonl");
        std::fs::write(&rows, "{\"prompt\": \"a b c d e f g h i j k l\", \"completion\": \" m\"}\n{\"prompt\": \"a\", \"completion\": \" b c d e f g h i j k l m n o p\"}\n").unwrap();
        let lengths = LengthOptions { max_length: Some(6), truncation: TruncationMode::KeepStart, ..Default::default() };
        let out = load_completions_with(&rows, &tokenizer(), lengths, ReadOptions::default(), PairsAs::Chosen).unwrap();
        assert_eq!(out.dropped, vec![0]);
        assert_eq!(out.truncated, 1);
        assert_eq!(out.examples[0].sequence.input_ids.len(), 6);
        // as for pairs, max_prompt_length cuts the prompt before max_length judges it
        let cut = LengthOptions { max_prompt_length: Some(3), ..lengths };
        let out = load_completions_with(&rows, &tokenizer(), cut, ReadOptions::default(), PairsAs::Chosen).unwrap();
        assert!(out.dropped.is_empty());
        assert_eq!(out.examples[0].sequence.prompt_len(), 3);
    }
}
