//! Human preference annotation for dipole: annotators judge pairs of responses on a web page
//! (or through its JSON API), the judgments live in an SQLite database, agreement between
//! annotators is measured (Cohen's and Fleiss' kappa, Krippendorff's alpha), and the majority
//! vote is exported as a TRL preference dataset with each pair's agreement.
//!
//! ```no_run
//! use dipole_annotate::{AppState, ExportOptions, PairMode, Store, read_candidates};
//! # fn main() -> Result<(), dipole_annotate::AnnotateError> {
//! let mut store = Store::open("round1.sqlite".as_ref())?;
//! store.load(&read_candidates("candidates.jsonl".as_ref(), None, PairMode::All)?)?;
//! for a in store.add_annotators(&["alice".into(), "bob".into(), "carol".into()])? {
//!     println!("{} {}", a.name, a.url("http://127.0.0.1:8080"));
//! }
//! let listener = std::net::TcpListener::bind("127.0.0.1:8080").unwrap();
//! dipole_annotate::serve(listener, AppState::new(store, 3))?;
//! // later: majority pairs
//! let export = Store::open("round1.sqlite".as_ref())?.export(ExportOptions::default())?;
//! export.write("round1.sqlite".as_ref(), "pairs.jsonl".as_ref())?;
//! # Ok(()) }
//! ```

pub mod agreement;
pub mod candidates;
pub mod error;
pub mod export;
pub mod server;
pub mod stats;
pub mod store;

pub use agreement::{cohen_kappa, fleiss_kappa, krippendorff_alpha_nominal};
pub use candidates::{Candidate, Candidates, PairMode, read_candidates};
pub use error::{AnnotateError, Result};
pub use export::{Excluded, Exclusion, Export, ExportOptions, ExportedPair, PairVotes, VoteCounts, report_path};
pub use server::{AppState, router, serve};
pub use stats::{AnnotatorStats, PairAgreement, Stats};
pub use store::{Annotator, Choice, Judgment, LoadOutcome, Progress, Shown, Store, StoredItem, Vote, left_is_first};
