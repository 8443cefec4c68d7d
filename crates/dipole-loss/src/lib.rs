//! Sequence log-probs and preference objectives (DPO and its relatives), each a small pure function
//! of log-probs, generic over the burn backend.

pub mod logps;

pub use logps::{SequenceLogps, sequence_logps};
