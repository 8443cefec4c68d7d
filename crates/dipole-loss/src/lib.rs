//! Sequence log-probs and preference objectives (DPO and its relatives), each a small pure function
//! of log-probs, generic over the burn backend.

pub mod logps;
pub mod metrics;
pub mod objectives;
pub mod token_stats;

pub use objectives::{
    CpoVariant, FDivergence, KtoOutput, LossType, ObjectiveConfig, ObjectiveError, ObjectiveOutput, ObjectiveState, PairInputs, kto_loss, preference_loss,
};
pub use metrics::preference_metrics;
pub use logps::{
    SequenceLogps, ld_weights, prediction_window, sequence_logps, sequence_logps_window, token_entropy, token_logps, token_logps_and_entropy_ops, token_logps_ops,
    token_logps_and_entropy, wpo_weights, wpo_weights_aligned, wpo_weights_from, PositionScores,
};
pub use token_stats::{TokenStats, token_stats, token_stats_aligned, token_stats_from_positions, token_stats_with_entropy};
