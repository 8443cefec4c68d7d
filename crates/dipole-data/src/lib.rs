//! Preference data for dipole: records in TRL's formats, Hugging Face tokenizers and chat templates,
//! TRL-identical tokenisation, and batches of token ids. Tensor-free: the trainer turns batches into
//! tensors on whatever backend it runs.

pub mod batch;
pub mod byte_tokenizer;
pub mod chat;
pub mod completion;
pub mod dataset;
pub mod error;
pub mod generation;
pub mod json;
pub mod parquet_io;
pub mod ratings;
pub mod record;
pub mod split;
pub mod tokenize;
pub mod tokenizer;

pub use batch::PreferenceBatch;
pub use byte_tokenizer::write_byte_tokenizer;
pub use chat::ChatTemplate;
pub use completion::{CompletionInputs, PairsAs, PreparedCompletions, SequenceBatch, kto_pairs, load_completions_with};
pub use dataset::{LengthOptions, PreparedPairs, load_pairs, load_pairs_with, prepare_records};
pub use error::{DataError, Location, Result, RowError};
pub use record::{Content, Format, Message, PreferenceRecord, ReadOptions, Row, Rows, UnpairedRecord, read_preferences, read_rows};
pub use tokenize::{PairInputs, Sequence, TokenizedPair, TruncationMode, prepare_pair, prepare_pair_with_prompt_limit, tokenize_completion, tokenize_pair};
pub use tokenizer::{SpecialToken, Tokenizer};
