//! Tokenisation exactly as TRL 1.16's `DPOTrainer` does it, so our token ids equal TRL's.
//!
//! Standard format: the EOS *string* is appended to each completion, `prompt` and
//! `prompt + completion` are tokenised with special tokens (the post-processor's BOS), and the
//! prompt/completion boundary is the common prefix of the two token lists (minimum over chosen and
//! rejected). BPE can merge a trailing prompt space into the first completion token; the common
//! prefix moves the boundary back in that case instead of splitting a token.
//! Conversational format: the same on the rendered chat template (prompt with the generation
//! prompt), tokenised without special tokens because the template writes them, and no extra EOS.

use crate::error::RowError;
use crate::chat::ChatTemplate;
use crate::record::{Content, PreferenceRecord};
use crate::tokenizer::Tokenizer;

/// Token ids of one preference pair before truncation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenizedPair {
    /// Index of the record in its file.
    pub index: usize,
    pub prompt_ids: Vec<u32>,
    pub chosen_ids: Vec<u32>,
    pub rejected_ids: Vec<u32>,
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// The texts TRL tokenises for one prompt and completion: the prompt, prompt + completion, and
/// whether special tokens are added (standard format) or written by the chat template.
fn render_texts(
    tokenizer: &Tokenizer,
    template: Option<&ChatTemplate>,
    prompt: &Content,
    completion: &Content,
) -> Result<(String, String, bool), String> {
    match (prompt, completion) {
        (Content::Text(p), Content::Text(c)) => {
            let eos = tokenizer
                .eos
                .as_ref()
                .map(|t| t.text.as_str())
                .ok_or("the tokenizer has no EOS token to end completions with")?;
            Ok((p.clone(), format!("{p}{c}{eos}"), true))
        }
        (Content::Messages(p), Content::Messages(c)) => {
            let template = template.ok_or(
                "conversational record, but the model has no chat_template in tokenizer_config.json",
            )?;
            let mut all = p.clone();
            all.extend_from_slice(c);
            let render = |messages: &[_], generation_prompt| template.render(messages, generation_prompt).map_err(|e| e.to_string());
            Ok((render(p, true)?, render(&all, false)?, false))
        }
        _ => Err("prompt and completion mix plain text and message lists".into()),
    }
}

/// Tokenises one record. Errors are reasons (the caller knows the file and line).
pub fn tokenize_pair(
    tokenizer: &Tokenizer,
    template: Option<&ChatTemplate>,
    record: &PreferenceRecord,
) -> Result<TokenizedPair, RowError> {
    pair_tokens(tokenizer, template, record).map_err(RowError)
}

fn pair_tokens(
    tokenizer: &Tokenizer,
    template: Option<&ChatTemplate>,
    record: &PreferenceRecord,
) -> Result<TokenizedPair, String> {
    let (prompt, chosen, special) = render_texts(tokenizer, template, &record.prompt, &record.chosen)?;
    let (_, rejected, _) = render_texts(tokenizer, template, &record.prompt, &record.rejected)?;
    let enc = |text: &str| tokenizer.encode(text, special).map_err(|e| e.reason);
    let prompt_ids = enc(&prompt)?;
    let chosen_full = enc(&chosen)?;
    let rejected_full = enc(&rejected)?;
    let prompt_len = common_prefix(&prompt_ids, &chosen_full).min(common_prefix(&prompt_ids, &rejected_full));
    let pair = TokenizedPair {
        index: record.index,
        prompt_ids: prompt_ids[..prompt_len].to_vec(),
        chosen_ids: chosen_full[prompt_len..].to_vec(),
        rejected_ids: rejected_full[prompt_len..].to_vec(),
    };
    if pair.chosen_ids.is_empty() || pair.rejected_ids.is_empty() {
        let which = if pair.chosen_ids.is_empty() { "chosen" } else { "rejected" };
        return Err(format!("{which} completion is empty after tokenisation"));
    }
    Ok(pair)
}

/// Tokenises one prompt + completion (SFT, KTO) with the same rules as [`tokenize_pair`]:
/// returns `(prompt_ids, completion_ids)`.
pub fn tokenize_completion(
    tokenizer: &Tokenizer,
    template: Option<&ChatTemplate>,
    prompt: &Content,
    completion: &Content,
) -> Result<(Vec<u32>, Vec<u32>), RowError> {
    completion_tokens(tokenizer, template, prompt, completion).map_err(RowError)
}

fn completion_tokens(
    tokenizer: &Tokenizer,
    template: Option<&ChatTemplate>,
    prompt: &Content,
    completion: &Content,
) -> Result<(Vec<u32>, Vec<u32>), String> {
    let (prompt, full, special) = render_texts(tokenizer, template, prompt, completion)?;
    let prompt_ids = tokenizer.encode(&prompt, special).map_err(|e| e.reason)?;
    let full_ids = tokenizer.encode(&full, special).map_err(|e| e.reason)?;
    let cut = common_prefix(&prompt_ids, &full_ids);
    if cut == full_ids.len() {
        return Err("completion is empty after tokenisation".into());
    }
    Ok((full_ids[..cut].to_vec(), full_ids[cut..].to_vec()))
}

/// Which end of `prompt + completion` survives truncation to `max_length`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TruncationMode {
    /// Keep the first `max_length` tokens (TRL's default).
    #[default]
    KeepStart,
    /// Keep the last `max_length` tokens.
    KeepEnd,
}

/// One sequence ready for the model: ids and a mask marking completion tokens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sequence {
    pub input_ids: Vec<u32>,
    pub completion_mask: Vec<u8>,
}

impl Sequence {
    /// Tokens before the first completion token.
    pub fn prompt_len(&self) -> usize {
        self.completion_mask.iter().take_while(|&&m| m == 0).count()
    }
}

/// A pair ready for batching.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PairInputs {
    pub index: usize,
    pub chosen: Sequence,
    pub rejected: Sequence,
}

pub(crate) fn build_sequence(prompt: &[u32], completion: &[u32], max_length: Option<usize>, mode: TruncationMode) -> Sequence {
    let mut input_ids = prompt.to_vec();
    input_ids.extend_from_slice(completion);
    let mut completion_mask = vec![0u8; prompt.len()];
    completion_mask.extend(std::iter::repeat_n(1u8, completion.len()));
    if let Some(max) = max_length
        && input_ids.len() > max {
            match mode {
                TruncationMode::KeepStart => {
                    input_ids.truncate(max);
                    completion_mask.truncate(max);
                }
                TruncationMode::KeepEnd => {
                    let cut = input_ids.len() - max;
                    input_ids.drain(..cut);
                    completion_mask.drain(..cut);
                }
            }
        }
    Sequence {
        input_ids,
        completion_mask,
    }
}

/// TRL's length rules for a prompt: cut to its last `max_prompt_length` tokens (when set), then
/// `None` when it alone reaches `max_length` (TRL removes such examples).
pub(crate) fn limit_prompt(prompt: &[u32], max_prompt_length: Option<usize>, max_length: Option<usize>) -> Option<&[u32]> {
    let prompt = match max_prompt_length {
        Some(m) if prompt.len() > m => &prompt[prompt.len() - m..],
        _ => prompt,
    };
    max_length.is_none_or(|max| prompt.len() < max).then_some(prompt)
}

/// Applies TRL's length rules: `None` when the prompt alone reaches `max_length` (TRL removes such
/// examples), else the truncated chosen and rejected sequences.
pub fn prepare_pair(pair: &TokenizedPair, max_length: Option<usize>, mode: TruncationMode) -> Option<PairInputs> {
    prepare_pair_with_prompt_limit(pair, None, max_length, mode)
}

/// [`prepare_pair`] after cutting the prompt to its last `max_prompt_length` tokens (the older TRL
/// rule, off by default in TRL 1.16).
pub fn prepare_pair_with_prompt_limit(
    pair: &TokenizedPair,
    max_prompt_length: Option<usize>,
    max_length: Option<usize>,
    mode: TruncationMode,
) -> Option<PairInputs> {
    let prompt = limit_prompt(&pair.prompt_ids, max_prompt_length, max_length)?;
    Some(PairInputs {
        index: pair.index,
        chosen: build_sequence(prompt, &pair.chosen_ids, max_length, mode),
        rejected: build_sequence(prompt, &pair.rejected_ids, max_length, mode),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_start_truncates_completion_tail() {
        let pair = TokenizedPair {
            index: 0,
            prompt_ids: vec![1, 2, 3],
            chosen_ids: vec![4, 5, 6],
            rejected_ids: vec![7],
        };
        let p = prepare_pair(&pair, Some(5), TruncationMode::KeepStart).unwrap();
        assert_eq!(p.chosen.input_ids, vec![1, 2, 3, 4, 5]);
        assert_eq!(p.chosen.completion_mask, vec![0, 0, 0, 1, 1]);
        assert_eq!(p.rejected.input_ids, vec![1, 2, 3, 7]);
        let p = prepare_pair(&pair, Some(5), TruncationMode::KeepEnd).unwrap();
        assert_eq!(p.chosen.input_ids, vec![2, 3, 4, 5, 6]);
        assert!(prepare_pair(&pair, Some(3), TruncationMode::KeepStart).is_none());
        // a prompt limit cuts the prompt from the left first, which can save a pair from dropping
        let p = prepare_pair_with_prompt_limit(&pair, Some(1), Some(3), TruncationMode::KeepStart).unwrap();
        assert_eq!(p.chosen.input_ids, vec![3, 4, 5]);
        assert_eq!(p.chosen.completion_mask, vec![0, 1, 1]);
    }
}
