//! `cargo xtask annotate serve|export`: a round of human preference annotation (dipole-annotate):
//! a page where named annotators judge pairs, then the majority pairs as a TRL dataset.

use std::net::TcpListener;
use std::path::PathBuf;

use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, Subcommand, ValueEnum};
use dipole_annotate::{AppState, ExportOptions, LoadOutcome, PairMode, Store, read_candidates};
use dipole_data::Format;

#[derive(Subcommand, Debug)]
pub enum AnnotateCommand {
    /// Serve the annotation page and its JSON API; prints `NAME TOKEN URL` per annotator.
    Serve(ServeArgs),
    /// Majority-vote pairs of a round as TRL pairs, with agreement and votes; a report of the rest.
    Export(ExportArgs),
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Pairs {
    /// Every pair of a row's responses (n responses: n(n-1)/2 items).
    All,
    /// Neighbouring responses only: (r0, r1), (r1, r2), ... (n - 1 items).
    #[value(alias = "adjacent")]
    BestEffort,
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Candidates: `{prompt, responses: [..]}` rows, or `{prompt, chosen, rejected}` pairs to judge
    /// again (JSONL, JSON or Parquet; a file or a folder of shards).
    #[arg(long)]
    pub data: PathBuf,
    /// jsonl, json or parquet (default: by extension).
    #[arg(long)]
    pub format: Option<String>,
    /// The round's SQLite database: created if missing, reused on a restart (same candidates).
    #[arg(long)]
    pub db: PathBuf,
    /// Address to listen on (loopback unless told otherwise; port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub bind: String,
    /// Judgments from different annotators that make an item done.
    #[arg(long, default_value_t = 3, value_parser = crate::flags::at_least_one)]
    pub per_item: usize,
    /// Annotator names, comma-separated: new names get new tokens, known ones keep theirs.
    #[arg(long, value_delimiter = ',')]
    pub annotators: Vec<String>,
    /// Which pairs of a `responses` row become items.
    #[arg(long, value_enum, default_value_t = Pairs::All)]
    pub pairs: Pairs,
}

#[derive(Args, Debug)]
pub struct ExportArgs {
    /// The round's SQLite database.
    #[arg(long)]
    pub db: PathBuf,
    /// Output pairs (.jsonl, .json or .parquet); the report goes beside it (`NAME.report.json`).
    #[arg(long)]
    pub out: PathBuf,
    /// Least share of an item's judgments for the majority response (ties count for neither).
    #[arg(long, default_value_t = 0.6, value_parser = crate::flags::unit)]
    pub min_agreement: f64,
    /// Fewest judgments an exported item has.
    #[arg(long, default_value_t = 1, value_parser = crate::flags::at_least_one)]
    pub min_votes: usize,
}

pub fn run(command: AnnotateCommand) -> Result<()> {
    match command {
        AnnotateCommand::Serve(args) => serve(args),
        AnnotateCommand::Export(args) => export(args),
    }
}

fn serve(args: ServeArgs) -> Result<()> {
    let format = match &args.format {
        Some(f) => Some(Format::parse(f).ok_or_else(|| anyhow!("--format {f}: expected jsonl, json or parquet"))?),
        None => None,
    };
    let pairs = match args.pairs {
        Pairs::All => PairMode::All,
        Pairs::BestEffort => PairMode::Adjacent,
    };
    let candidates = read_candidates(&args.data, format, pairs)?;
    let mut store = Store::open(&args.db)?;
    match store.load(&candidates)? {
        LoadOutcome::Inserted(n) => eprintln!("{}: stored {n} items from {}", args.db.display(), args.data.display()),
        LoadOutcome::Reused(n) => eprintln!("{}: reusing its {n} items (the candidates of {})", args.db.display(), args.data.display()),
    }
    let annotators = store.add_annotators(&args.annotators)?;
    if annotators.is_empty() {
        bail!("{}: no annotators yet: pass --annotators NAME,NAME,...", args.db.display());
    }
    if annotators.len() < args.per_item {
        eprintln!("warning: --per-item {} with {} annotator(s): no item can be done", args.per_item, annotators.len());
    }
    let listener = TcpListener::bind(&args.bind).with_context(|| format!("--bind {}", args.bind))?;
    let addr = listener.local_addr().with_context(|| format!("--bind {}", args.bind))?;
    if !addr.ip().is_loopback() {
        eprintln!("warning: listening on {addr}, reachable from other machines over plain HTTP (tokens travel unencrypted)");
    }
    let base = format!("http://{addr}");
    println!("listening on {base}");
    for a in &annotators {
        println!("{} {} {}", a.name, a.token, a.url(&base));
    }
    eprintln!("stats: {base}/stats?token=TOKEN (any annotator's); Ctrl-C stops the server (every judgment is saved as it is made)");
    dipole_annotate::serve(listener, AppState::new(store, args.per_item))?;
    Ok(())
}

fn export(args: ExportArgs) -> Result<()> {
    let store = Store::open_existing(&args.db)?;
    let export = store.export(ExportOptions { min_agreement: args.min_agreement, min_votes: args.min_votes })?;
    let report = export.write(&args.db, &args.out)?;
    for e in &export.excluded {
        let v = e.votes;
        eprintln!("left out: item {} ({}): {} (first {}, second {}, tie {})", e.item, e.origin, e.reason.describe(), v.first, v.second, v.tie);
    }
    eprintln!(
        "exported {} of {} items to {}; {} left out (listed in {})",
        export.pairs.len(),
        export.items,
        args.out.display(),
        export.excluded.len(),
        report.display()
    );
    Ok(())
}
