//! `annotate serve` / `annotate export` end to end, through the real binary: three annotators judge
//! 20 items over the JSON API; the server is killed with SIGKILL halfway and restarted on the same
//! database (same tokens, no judgment lost); the export holds the majority pairs and reports the rest.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use dipole_annotate::{Vote, cohen_kappa};
use serde_json::{Value, json};

const NAMES: [&str; 3] = ["alice", "bob", "carol"];

/// The planned vote of alice, bob and carol on item `i` (1-based), and the expected outcome.
fn plan(i: usize) -> [Vote; 3] {
    use Vote::{First as F, Second as S, Tie as T};
    match i {
        1..=10 => [F, F, F],  // first, agreement 1
        11..=14 => [S, S, F], // second, 2/3
        15..=16 => [F, T, F], // first, 2/3 (a tie counts against agreement)
        17..=18 => [F, S, T], // no majority
        19 => [S, T, T],      // second, 1/3: below 0.6
        _ => [T, T, T],       // no majority
    }
}

fn write_candidates(dir: &Path, name: &str, n: usize) -> PathBuf {
    let path = dir.join(name);
    let text: String =
        (1..=n).map(|i| format!("{}\n", json!({"prompt": format!("Question {i}?"), "responses": [format!("first {i}"), format!("second {i}")]}))).collect();
    std::fs::write(&path, text).unwrap();
    path
}

struct Server {
    child: Child,
    base: String,
    tokens: Vec<(String, String)>,
    lines: mpsc::Receiver<String>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(dir: &Path, data: &Path, names: &str) -> Server {
    let db = dir.join("round.sqlite");
    let stderr = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("server.stderr")).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(["annotate", "serve", "--data", data.to_str().unwrap(), "--db", db.to_str().unwrap()])
        .args(["--bind", "127.0.0.1:0", "--per-item", "3", "--annotators", names])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let next = |lines: &mpsc::Receiver<String>| lines.recv_timeout(Duration::from_secs(30)).expect("a line from the server");
    let first = next(&lines);
    let base = first.strip_prefix("listening on ").unwrap_or_else(|| panic!("first line: {first}")).to_string();
    assert!(base.starts_with("http://127.0.0.1:"), "{base}");
    let count = names.split(',').count();
    let tokens = (0..count)
        .map(|_| {
            let line = next(&lines);
            let parts: Vec<&str> = line.split(' ').collect();
            assert_eq!(parts.len(), 3, "NAME TOKEN URL: {line}");
            assert_eq!(parts[2], format!("{base}/?token={}", parts[1]));
            assert!(parts[1].len() == 32 && parts[1].chars().all(|c| c.is_ascii_hexdigit()), "{line}");
            (parts[0].to_string(), parts[1].to_string())
        })
        .collect();
    Server { child, base, tokens, lines }
}

struct Api {
    agent: ureq::Agent,
    base: String,
}

impl Api {
    fn new(base: &str) -> Api {
        let agent = ureq::Agent::config_builder().http_status_as_error(false).timeout_global(Some(Duration::from_secs(10))).build().into();
        Api { agent, base: base.to_string() }
    }

    fn call(&self, method: &str, path: &str, token: &str, body: Option<Value>) -> (u16, Value) {
        let url = format!("{}{path}", self.base);
        let auth = format!("Bearer {token}");
        let r = match (method, body) {
            ("GET", _) => self.agent.get(url).header("Authorization", auth).call(),
            (_, Some(b)) => self.agent.post(url).header("Authorization", auth).header("Content-Type", "application/json").send(b.to_string()),
            (_, None) => self.agent.post(url).header("Authorization", auth).send_empty(),
        }
        .unwrap();
        let status = r.status().as_u16();
        let text = r.into_body().read_to_string().unwrap();
        (status, if text.is_empty() { Value::Null } else { serde_json::from_str(&text).unwrap() })
    }
}

/// One judgment by annotator `who` on their next item, following the plan; `None` when nothing is
/// left for them.
fn judge_next(api: &Api, who: usize, token: &str) -> Option<i64> {
    let (status, shown) = api.call("GET", "/api/next", token, None);
    if status == 204 {
        return None;
    }
    assert_eq!(status, 200, "{shown}");
    let item = shown["item"].as_i64().unwrap();
    let first_left = shown["a"] == format!("first {item}");
    let choice = match (plan(item as usize)[who], first_left) {
        (Vote::Tie, _) => "tie",
        (Vote::First, true) | (Vote::Second, false) => "a",
        _ => "b",
    };
    let (status, v) = api.call("POST", "/api/judgments", token, Some(json!({"item": item, "choice": choice})));
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["judgment"]["vote"], json!(plan(item as usize)[who]));
    Some(item)
}

#[test]
fn a_round_survives_sigkill_and_exports_the_majority_pairs() {
    let dir = tempfile::tempdir().unwrap();
    let data = write_candidates(dir.path(), "candidates.jsonl", 20);
    let server = serve(dir.path(), &data, "alice,bob,carol");
    let tokens: Vec<String> = server.tokens.iter().map(|(_, t)| t.clone()).collect();
    assert_eq!(server.tokens.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(), NAMES);
    let api = Api::new(&server.base);

    // alice's first choice is a slip, undone and made again
    let (_, shown) = api.call("GET", "/api/next", &tokens[0], None);
    assert_eq!(api.call("POST", "/api/judgments", &tokens[0], Some(json!({"item": 1, "choice": "tie"}))).0, 200);
    let (status, undone) = api.call("POST", "/api/undo", &tokens[0], None);
    assert_eq!((status, &undone["shown"]), (200, &shown));

    // round robin until 30 judgments are confirmed, then SIGKILL (Child::kill)
    let mut confirmed = 0;
    'first: loop {
        for (who, token) in tokens.iter().enumerate() {
            if confirmed == 30 {
                break 'first;
            }
            judge_next(&api, who, token).expect("items left");
            confirmed += 1;
        }
    }
    let mut server = server;
    server.child.kill().unwrap();
    server.child.wait().unwrap();
    let leftover: Vec<String> = server.lines.try_iter().collect();
    drop(server);

    // restarted on the same database, with one more annotator: old tokens unchanged, a new one for dave
    let server = serve(dir.path(), &data, "alice,bob,carol,dave");
    let again: Vec<String> = server.tokens.iter().map(|(_, t)| t.clone()).collect();
    assert_eq!(&again[..3], &tokens[..]);
    assert_eq!(server.tokens[3].0, "dave");
    assert!(!tokens.contains(&again[3]));
    let api = Api::new(&server.base);
    let (_, stats) = api.call("GET", "/api/stats", &tokens[2], None);
    assert_eq!(stats["judgments"], 30, "every confirmed judgment survived the kill");

    let mut more = true;
    while more {
        more = false;
        for (who, token) in tokens.iter().enumerate() {
            more |= judge_next(&api, who, token).is_some();
        }
    }
    for t in &again {
        assert_eq!(api.call("GET", "/api/next", t, None).0, 204);
    }
    check_stats(&api, &tokens[0]);
    let mut server = server;
    server.child.kill().unwrap();
    server.child.wait().unwrap();
    let leftover: Vec<String> = leftover.into_iter().chain(server.lines.try_iter()).collect();
    // after the NAME TOKEN URL lines, no token is printed again (stdout or stderr)
    let stderr = std::fs::read_to_string(dir.path().join("server.stderr")).unwrap();
    for t in &again {
        assert!(!stderr.contains(t.as_str()), "a token in the server's stderr:\n{stderr}");
        assert!(!leftover.iter().any(|l| l.contains(t.as_str())), "a token printed later: {leftover:?}");
    }

    check_export(dir.path());
    // a different candidate set on the same database is refused, naming both
    let other = write_candidates(dir.path(), "other.jsonl", 21);
    let out = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(["annotate", "serve", "--data", other.to_str().unwrap(), "--db", dir.path().join("round.sqlite").to_str().unwrap()])
        .args(["--bind", "127.0.0.1:0", "--annotators", "alice"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("holds 20 items from") && stderr.contains("other.jsonl") && stderr.contains("different candidate set (21 items)"), "{stderr}");
}

fn check_stats(api: &Api, token: &str) {
    let (_, stats) = api.call("GET", "/api/stats", token, None);
    assert_eq!((stats["items"].as_u64(), stats["done"].as_u64(), stats["judgments"].as_u64()), (Some(20), Some(20), Some(60)));
    let judged: Vec<u64> = stats["annotators"].as_array().unwrap().iter().map(|a| a["judged"].as_u64().unwrap()).collect();
    assert_eq!(judged, vec![20, 20, 20, 0]);
    // Cohen's kappa of alice and bob: the plan's two columns
    let pairs: Vec<(Vote, Vote)> = (1..=20).map(|i| (plan(i)[0], plan(i)[1])).collect();
    let want = cohen_kappa(&pairs).unwrap();
    let ab = &stats["pairs"][0];
    assert_eq!((ab["a"].as_str(), ab["b"].as_str(), ab["items"].as_u64()), (Some("alice"), Some("bob"), Some(20)));
    assert!((ab["kappa"].as_f64().unwrap() - want).abs() < 1e-12, "{ab} vs {want}");
    assert!(stats["fleiss_kappa"].is_number() && stats["krippendorff_alpha"].is_number(), "{stats}");
    assert_eq!(stats["pairs"][2]["kappa"], Value::Null, "alice and dave share no items");
}

fn check_export(dir: &Path) {
    let out = dir.join("pairs.jsonl");
    let run = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(["annotate", "export", "--db", dir.join("round.sqlite").to_str().unwrap(), "--out", out.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    for (item, why) in [(17, "no majority"), (18, "no majority"), (19, "agreement below the threshold"), (20, "no majority")] {
        assert!(stderr.contains(&format!("left out: item {item} (")) && stderr.contains(why), "{stderr}");
    }
    assert!(stderr.contains("exported 16 of 20 items"), "{stderr}");
    let rows: Vec<Value> = std::fs::read_to_string(&out).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows.len(), 16);
    for (i, row) in (1..=16).zip(&rows) {
        let (chosen, rejected, agreement, votes) = match i {
            1..=10 => ("first", "second", 1.0, json!({"chosen": 3, "rejected": 0, "tie": 0})),
            11..=14 => ("second", "first", 2.0 / 3.0, json!({"chosen": 2, "rejected": 1, "tie": 0})),
            _ => ("first", "second", 2.0 / 3.0, json!({"chosen": 2, "rejected": 0, "tie": 1})),
        };
        assert_eq!(row["prompt"], format!("Question {i}?"));
        assert_eq!(row["chosen"], format!("{chosen} {i}"), "item {i}");
        assert_eq!(row["rejected"], format!("{rejected} {i}"), "item {i}");
        assert!((row["agreement"].as_f64().unwrap() - agreement).abs() < 1e-12, "item {i}");
        assert_eq!(row["votes"], votes, "item {i}");
    }
    let report: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("pairs.report.json")).unwrap()).unwrap();
    let left: Vec<(u64, &str)> =
        report["excluded_items"].as_array().unwrap().iter().map(|e| (e["item"].as_u64().unwrap(), e["reason"].as_str().unwrap())).collect();
    assert_eq!(left, vec![(17, "no_majority"), (18, "no_majority"), (19, "below_threshold"), (20, "no_majority")]);
    // the export is a TRL dataset dipole reads
    let check = Command::new(env!("CARGO_BIN_EXE_xtask")).args(["data", "check", "--data", out.to_str().unwrap()]).output().unwrap();
    assert!(check.status.success(), "{}", String::from_utf8_lossy(&check.stderr));
}
