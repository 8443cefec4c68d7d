//! Preference data for dipole: records in TRL's formats, Hugging Face tokenizers and chat templates,
//! TRL-identical tokenisation, and batches of token ids. Tensor-free: the trainer turns batches into
//! tensors on whatever backend it runs.

pub mod batch;
pub mod chat;
pub mod dataset;
pub mod error;
pub mod record;
pub mod tokenize;
pub mod tokenizer;

pub use batch::PreferenceBatch;
pub use chat::ChatTemplate;
pub use dataset::{LengthOptions, PreparedPairs, load_pairs, prepare_records};
pub use error::{DataError, Result};
pub use record::{Content, Message, PreferenceRecord, read_jsonl};
pub use tokenize::{PairInputs, Sequence, TokenizedPair, TruncationMode, prepare_pair, tokenize_pair};
pub use tokenizer::{SpecialToken, Tokenizer};
