//! The annotation database: one SQLite file (WAL, synchronous = FULL) holding the items, the
//! annotators with their tokens, and every judgment. Each judgment (and each undo) is one
//! transaction, committed before the server answers, so a killed server loses none it confirmed.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::candidates::Candidates;
use crate::error::{AnnotateError, Result};

/// `PRAGMA application_id` of an annotation database ("dpoa").
const APPLICATION_ID: i64 = 0x6470_6f61;
const SCHEMA_VERSION: i64 = 1;
/// The longest comment kept, in characters.
pub const MAX_COMMENT_CHARS: usize = 10_000;

const SCHEMA: &str = "
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE items (
    id INTEGER PRIMARY KEY,
    prompt TEXT NOT NULL,
    first TEXT NOT NULL,
    second TEXT NOT NULL,
    origin TEXT NOT NULL
);
CREATE TABLE annotators (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    token TEXT NOT NULL UNIQUE,
    created INTEGER NOT NULL
);
CREATE TABLE judgments (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    item INTEGER NOT NULL REFERENCES items(id),
    annotator INTEGER NOT NULL REFERENCES annotators(id),
    vote TEXT NOT NULL CHECK (vote IN ('first', 'second', 'tie')),
    side TEXT NOT NULL CHECK (side IN ('a', 'b', 'tie')),
    left_first INTEGER NOT NULL,
    comment TEXT,
    created INTEGER NOT NULL,
    UNIQUE (item, annotator)
);
CREATE INDEX judgments_by_annotator ON judgments (annotator, id);
";

/// A choice as the annotator made it: the left response (A), the right one (B), or neither.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Choice {
    A,
    B,
    Tie,
}

/// A choice in terms of the item: its first response, its second, or a tie.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Vote {
    First,
    Second,
    Tie,
}

impl Vote {
    fn as_str(self) -> &'static str {
        match self {
            Vote::First => "first",
            Vote::Second => "second",
            Vote::Tie => "tie",
        }
    }

    fn parse(s: &str) -> Self {
        match s {
            "first" => Vote::First,
            "second" => Vote::Second,
            _ => Vote::Tie,
        }
    }
}

impl Choice {
    fn as_str(self) -> &'static str {
        match self {
            Choice::A => "a",
            Choice::B => "b",
            Choice::Tie => "tie",
        }
    }

    fn parse(s: &str) -> Self {
        match s {
            "a" => Choice::A,
            "b" => Choice::B,
            _ => Choice::Tie,
        }
    }

    /// The response this choice picks, given which one was shown on the left.
    pub fn vote(self, left_is_first: bool) -> Vote {
        match (self, left_is_first) {
            (Choice::Tie, _) => Vote::Tie,
            (Choice::A, true) | (Choice::B, false) => Vote::First,
            (Choice::A, false) | (Choice::B, true) => Vote::Second,
        }
    }
}

/// Whether `annotator` sees item `item`'s first response on the left (as A): a fixed coin flip per
/// item and annotator, so a reload shows the same order and annotators differ.
pub fn left_is_first(item: i64, annotator: &str) -> bool {
    let hash = blake3::hash(format!("dipole-annotate side\0{item}\0{annotator}").as_bytes());
    hash.as_bytes()[0] & 1 == 0
}

/// A person who judges, and the token that identifies them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Annotator {
    pub id: i64,
    pub name: String,
    pub token: String,
}

impl Annotator {
    /// The page's address for this annotator (the page reads the token from it).
    pub fn url(&self, base: &str) -> String {
        format!("{}/?token={}", base.trim_end_matches('/'), self.token)
    }
}

/// An item as one annotator sees it: A on the left, B on the right.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Shown {
    pub item: i64,
    pub prompt: Value,
    pub a: Value,
    pub b: Value,
}

/// One recorded judgment.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Judgment {
    pub id: i64,
    pub item: i64,
    pub annotator: String,
    /// The side as shown to the annotator.
    pub choice: Choice,
    /// The response it picks.
    pub vote: Vote,
    pub comment: Option<String>,
    /// Unix seconds.
    pub created: i64,
}

/// An annotator's progress: judgments made, and items still open to them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Progress {
    pub name: String,
    pub judged: usize,
    pub left: usize,
}

/// An item with its contents, for the export.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredItem {
    pub id: i64,
    pub prompt: Value,
    pub first: Value,
    pub second: Value,
    pub origin: String,
}

/// One vote: `(item, annotator id, vote)`.
pub type VoteRow = (i64, i64, Vote);

/// What [`Store::load`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoadOutcome {
    /// The database was empty; this many items were stored.
    Inserted(usize),
    /// The database already held this candidate set (this many items); nothing changed.
    Reused(usize),
}

/// An open annotation database.
pub struct Store {
    conn: Connection,
    path: PathBuf,
}

fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

fn parse_json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or(Value::Null)
}

/// A new random token: 128 bits from the operating system, as 32 hex digits.
fn new_token() -> Result<String> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).map_err(AnnotateError::Random)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Annotator names: what a URL, a log line and a table cell can hold unescaped.
fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty() && name.len() <= 64 && name.chars().all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c));
    if ok { Ok(()) } else { Err(AnnotateError::AnnotatorName { name: name.to_string() }) }
}

impl Store {
    /// Opens (creating if needed) the database at `path`; a file that is not an annotation
    /// database is an error, and is left untouched.
    pub fn open(path: &Path) -> Result<Store> {
        let conn = Connection::open(path).map_err(AnnotateError::db(path))?;
        conn.busy_timeout(Duration::from_secs(10)).map_err(AnnotateError::db(path))?;
        let store = Store { conn, path: path.to_path_buf() };
        store.init()?;
        Ok(store)
    }

    /// Opens an existing database (never creates one: for reading a round, as the export does).
    pub fn open_existing(path: &Path) -> Result<Store> {
        if !path.is_file() {
            return Err(AnnotateError::NoDatabase { path: path.to_path_buf() });
        }
        Self::open(path)
    }

    fn init(&self) -> Result<()> {
        let db = || AnnotateError::db(&self.path);
        let pragma = |name: &str| self.conn.query_row(&format!("PRAGMA {name}"), [], |r| r.get::<_, i64>(0));
        let application_id = pragma("application_id").map_err(db())?;
        let tables: i64 = self.conn.query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get(0)).map_err(db())?;
        let fresh = application_id == 0 && tables == 0;
        if !fresh && application_id != APPLICATION_ID {
            let reason = "not an annotation database (an SQLite file made by something else): pass a new --db file".to_string();
            return Err(AnnotateError::NotAnnotationDb { path: self.path.clone(), reason });
        }
        // WAL: readers never block the writer, and a commit is one append to the log
        self.conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get::<_, String>(0)).map_err(db())?;
        self.conn.pragma_update(None, "synchronous", "FULL").map_err(db())?;
        self.conn.pragma_update(None, "foreign_keys", "ON").map_err(db())?;
        if fresh {
            let sql = format!("BEGIN; {SCHEMA} PRAGMA application_id = {APPLICATION_ID}; PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;");
            self.conn.execute_batch(&sql).map_err(db())?;
        }
        let version = pragma("user_version").map_err(db())?;
        if version != SCHEMA_VERSION {
            let reason = format!("annotation database schema {version}; this dipole reads schema {SCHEMA_VERSION}");
            return Err(AnnotateError::NotAnnotationDb { path: self.path.clone(), reason });
        }
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn meta(&self, key: &str) -> Result<Option<String>> {
        self.conn
            .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .optional()
            .map_err(AnnotateError::db(&self.path))
    }

    /// Number of items stored.
    pub fn item_count(&self) -> Result<usize> {
        let n: i64 = self.conn.query_row("SELECT count(*) FROM items", [], |r| r.get(0)).map_err(AnnotateError::db(&self.path))?;
        Ok(n as usize)
    }

    /// Stores the candidates as items 1, 2, ... in an empty database; a database that already holds
    /// the same candidate set is reused as it is, one holding a different set is an error.
    pub fn load(&mut self, candidates: &Candidates) -> Result<LoadOutcome> {
        let fingerprint = candidates.fingerprint();
        if let Some(held) = self.meta("fingerprint")? {
            let items = self.item_count()?;
            if held == fingerprint {
                return Ok(LoadOutcome::Reused(items));
            }
            let held_source = self.meta("source")?.unwrap_or_else(|| "an unknown file".into());
            return Err(AnnotateError::CandidatesMismatch {
                db: self.path.clone(),
                data: candidates.source.clone(),
                held: items,
                held_source,
                given: candidates.items.len(),
            });
        }
        let db = AnnotateError::db(&self.path);
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(AnnotateError::db(&self.path))?;
        {
            let mut insert = tx
                .prepare("INSERT INTO items (id, prompt, first, second, origin) VALUES (?1, ?2, ?3, ?4, ?5)")
                .map_err(AnnotateError::db(&self.path))?;
            for (i, c) in candidates.items.iter().enumerate() {
                let row = params![i as i64 + 1, c.prompt.to_string(), c.first.to_string(), c.second.to_string(), c.origin];
                insert.execute(row).map_err(AnnotateError::db(&self.path))?;
            }
            let mut meta = tx.prepare("INSERT INTO meta (key, value) VALUES (?1, ?2)").map_err(AnnotateError::db(&self.path))?;
            meta.execute(params!["fingerprint", fingerprint]).map_err(AnnotateError::db(&self.path))?;
            meta.execute(params!["source", candidates.source.display().to_string()]).map_err(AnnotateError::db(&self.path))?;
        }
        tx.commit().map_err(db)?;
        Ok(LoadOutcome::Inserted(candidates.items.len()))
    }

    /// Adds the annotators not yet known (each with a new random token) and returns every
    /// annotator of the database, known ones with the token they already had.
    pub fn add_annotators(&mut self, names: &[String]) -> Result<Vec<Annotator>> {
        for name in names {
            check_name(name)?;
        }
        let known: Vec<String> = self.annotators()?.into_iter().map(|a| a.name).collect();
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(AnnotateError::db(&self.path))?;
        for name in names.iter().filter(|n| !known.contains(n)) {
            tx.execute("INSERT OR IGNORE INTO annotators (name, token, created) VALUES (?1, ?2, ?3)", params![name, new_token()?, now()])
                .map_err(AnnotateError::db(&self.path))?;
        }
        tx.commit().map_err(AnnotateError::db(&self.path))?;
        self.annotators()
    }

    /// Every annotator, in the order they were added.
    pub fn annotators(&self) -> Result<Vec<Annotator>> {
        let db = || AnnotateError::db(&self.path);
        let mut stmt = self.conn.prepare("SELECT id, name, token FROM annotators ORDER BY id").map_err(db())?;
        let rows = stmt.query_map([], |r| Ok(Annotator { id: r.get(0)?, name: r.get(1)?, token: r.get(2)? })).map_err(db())?;
        rows.collect::<rusqlite::Result<Vec<_>>>().map_err(db())
    }

    /// The annotator a token belongs to.
    pub fn authenticate(&self, token: &str) -> Result<Annotator> {
        self.conn
            .query_row("SELECT id, name, token FROM annotators WHERE token = ?1", [token], |r| {
                Ok(Annotator { id: r.get(0)?, name: r.get(1)?, token: r.get(2)? })
            })
            .optional()
            .map_err(AnnotateError::db(&self.path))?
            .ok_or(AnnotateError::UnknownToken)
    }

    fn shown(&self, who: &Annotator, item: i64) -> Result<Shown> {
        let row: Option<(String, String, String)> = self
            .conn
            .query_row("SELECT prompt, first, second FROM items WHERE id = ?1", [item], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .optional()
            .map_err(AnnotateError::db(&self.path))?;
        let (prompt, first, second) = row.ok_or(AnnotateError::NoSuchItem { item })?;
        let (first, second) = (parse_json(&first), parse_json(&second));
        let (a, b) = if left_is_first(item, &who.name) { (first, second) } else { (second, first) };
        Ok(Shown { item, prompt: parse_json(&prompt), a, b })
    }

    /// The next item for `who`: one they have not judged that has fewer than `per_item`
    /// judgments, those closest to done first (so that items complete, and overlap for agreement
    /// builds up early), then in file order. `None` when nothing is left for them.
    pub fn next(&self, who: &Annotator, per_item: usize) -> Result<Option<Shown>> {
        let item: Option<i64> = self
            .conn
            .query_row(
                "SELECT i.id FROM items i LEFT JOIN judgments j ON j.item = i.id
                 WHERE NOT EXISTS (SELECT 1 FROM judgments k WHERE k.item = i.id AND k.annotator = ?1)
                 GROUP BY i.id HAVING count(j.id) < ?2 ORDER BY count(j.id) DESC, i.id LIMIT 1",
                params![who.id, per_item as i64],
                |r| r.get(0),
            )
            .optional()
            .map_err(AnnotateError::db(&self.path))?;
        item.map(|item| self.shown(who, item)).transpose()
    }

    /// Records `who`'s choice on `item` in one transaction. A choice on an item they already judged
    /// is refused (undo first); an item that filled up meanwhile still takes it (no work is lost).
    pub fn judge(&mut self, who: &Annotator, item: i64, choice: Choice, comment: Option<&str>) -> Result<Judgment> {
        let comment = comment.map(str::trim).filter(|c| !c.is_empty());
        if let Some(c) = comment
            && c.chars().count() > MAX_COMMENT_CHARS
        {
            return Err(AnnotateError::BadRequest(format!("comment is longer than {MAX_COMMENT_CHARS} characters")));
        }
        let db = || AnnotateError::db(&self.path);
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(db())?;
        let exists: Option<i64> = tx.query_row("SELECT id FROM items WHERE id = ?1", [item], |r| r.get(0)).optional().map_err(db())?;
        if exists.is_none() {
            return Err(AnnotateError::NoSuchItem { item });
        }
        let judged: Option<i64> = tx
            .query_row("SELECT id FROM judgments WHERE item = ?1 AND annotator = ?2", params![item, who.id], |r| r.get(0))
            .optional()
            .map_err(db())?;
        if judged.is_some() {
            return Err(AnnotateError::AlreadyJudged { annotator: who.name.clone(), item });
        }
        let left_first = left_is_first(item, &who.name);
        let vote = choice.vote(left_first);
        let created = now();
        tx.execute(
            "INSERT INTO judgments (item, annotator, vote, side, left_first, comment, created) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![item, who.id, vote.as_str(), choice.as_str(), left_first, comment, created],
        )
        .map_err(db())?;
        let id = tx.last_insert_rowid();
        tx.commit().map_err(db())?;
        Ok(Judgment { id, item, annotator: who.name.clone(), choice, vote, comment: comment.map(String::from), created })
    }

    /// Removes `who`'s latest judgment (again and again: each undo takes the latest one left), and
    /// returns it with its item as shown to them, to be judged again.
    pub fn undo(&mut self, who: &Annotator) -> Result<(Judgment, Shown)> {
        let last = self.judgments_of(who)?.pop().ok_or_else(|| AnnotateError::NothingToUndo { annotator: who.name.clone() })?;
        let db = || AnnotateError::db(&self.path);
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(db())?;
        tx.execute("DELETE FROM judgments WHERE id = ?1", [last.id]).map_err(db())?;
        tx.commit().map_err(db())?;
        let shown = self.shown(who, last.item)?;
        Ok((last, shown))
    }

    /// `who`'s judgments, oldest first.
    pub fn judgments_of(&self, who: &Annotator) -> Result<Vec<Judgment>> {
        let db = || AnnotateError::db(&self.path);
        let mut stmt = self
            .conn
            .prepare("SELECT id, item, side, vote, comment, created FROM judgments WHERE annotator = ?1 ORDER BY id")
            .map_err(db())?;
        let rows = stmt
            .query_map([who.id], |r| {
                Ok(Judgment {
                    id: r.get(0)?,
                    item: r.get(1)?,
                    annotator: who.name.clone(),
                    choice: Choice::parse(&r.get::<_, String>(2)?),
                    vote: Vote::parse(&r.get::<_, String>(3)?),
                    comment: r.get(4)?,
                    created: r.get(5)?,
                })
            })
            .map_err(db())?;
        rows.collect::<rusqlite::Result<Vec<_>>>().map_err(db())
    }

    /// Every vote, `(item, annotator id, vote)`, in the order they were made.
    pub fn votes(&self) -> Result<Vec<VoteRow>> {
        let db = || AnnotateError::db(&self.path);
        let mut stmt = self.conn.prepare("SELECT item, annotator, vote FROM judgments ORDER BY id").map_err(db())?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, Vote::parse(&r.get::<_, String>(2)?)))).map_err(db())?;
        rows.collect::<rusqlite::Result<Vec<_>>>().map_err(db())
    }

    /// Every item with its contents, in id order.
    pub fn items(&self) -> Result<Vec<StoredItem>> {
        let db = || AnnotateError::db(&self.path);
        let mut stmt = self.conn.prepare("SELECT id, prompt, first, second, origin FROM items ORDER BY id").map_err(db())?;
        let rows = stmt
            .query_map([], |r| {
                Ok(StoredItem {
                    id: r.get(0)?,
                    prompt: parse_json(&r.get::<_, String>(1)?),
                    first: parse_json(&r.get::<_, String>(2)?),
                    second: parse_json(&r.get::<_, String>(3)?),
                    origin: r.get(4)?,
                })
            })
            .map_err(db())?;
        rows.collect::<rusqlite::Result<Vec<_>>>().map_err(db())
    }

    /// `who`'s judgments so far and the items still open to them.
    pub fn progress(&self, who: &Annotator, per_item: usize) -> Result<Progress> {
        let db = || AnnotateError::db(&self.path);
        let judged: i64 = self.conn.query_row("SELECT count(*) FROM judgments WHERE annotator = ?1", [who.id], |r| r.get(0)).map_err(db())?;
        let left: i64 = self
            .conn
            .query_row(
                "SELECT count(*) FROM items i
                 WHERE NOT EXISTS (SELECT 1 FROM judgments k WHERE k.item = i.id AND k.annotator = ?1)
                   AND (SELECT count(*) FROM judgments j WHERE j.item = i.id) < ?2",
                params![who.id, per_item as i64],
                |r| r.get(0),
            )
            .map_err(db())?;
        Ok(Progress { name: who.name.clone(), judged: judged as usize, left: left as usize })
    }
}
