//! What the API and browser tests share: candidates on disk, an in-process server on a free
//! loopback port, and a small HTTP client.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use dipole_annotate::{AppState, PairMode, Store, read_candidates};
use serde_json::{Value, json};

/// `n` standard-format candidates `{prompt, responses: [good, bad]}`.
pub fn write_candidates(dir: &Path, n: usize) -> PathBuf {
    let path = dir.join("candidates.jsonl");
    let text: String = (1..=n)
        .map(|i| format!("{}\n", json!({"prompt": format!("Question {i}?"), "responses": [format!("good answer {i}"), format!("bad answer {i}")]})))
        .collect();
    std::fs::write(&path, text).unwrap();
    path
}

/// A server on 127.0.0.1 (free port) over `db`, loaded from `data`; returns its base URL and
/// the annotators `(name, token)`.
pub fn start_server(db: &Path, data: &Path, per_item: usize, names: &[&str]) -> (String, Vec<(String, String)>) {
    let mut store = Store::open(db).unwrap();
    store.load(&read_candidates(data, None, PairMode::All).unwrap()).unwrap();
    let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    let annotators = store.add_annotators(&names).unwrap().into_iter().map(|a| (a.name, a.token)).collect();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || dipole_annotate::serve(listener, AppState::new(store, per_item)));
    (base, annotators)
}

pub struct Client {
    agent: ureq::Agent,
    pub base: String,
}

impl Client {
    pub fn new(base: &str) -> Self {
        let agent = ureq::Agent::config_builder().http_status_as_error(false).timeout_global(Some(Duration::from_secs(10))).build().into();
        Client { agent, base: base.to_string() }
    }

    fn finish(r: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> (u16, Value) {
        let r = r.expect("request reaches the server");
        let status = r.status().as_u16();
        let text = r.into_body().read_to_string().unwrap();
        (status, if text.is_empty() { Value::Null } else { serde_json::from_str(&text).unwrap_or(Value::String(text)) })
    }

    /// GET with an optional bearer token: (status, JSON body or Null).
    pub fn get(&self, path: &str, token: Option<&str>) -> (u16, Value) {
        let mut req = self.agent.get(format!("{}{path}", self.base));
        if let Some(t) = token {
            req = req.header("Authorization", format!("Bearer {t}"));
        }
        Self::finish(req.call())
    }

    /// POST of a raw body (None: empty).
    pub fn post(&self, path: &str, token: Option<&str>, body: Option<&str>) -> (u16, Value) {
        let mut req = self.agent.post(format!("{}{path}", self.base));
        if let Some(t) = token {
            req = req.header("Authorization", format!("Bearer {t}"));
        }
        match body {
            Some(b) => Self::finish(req.header("Content-Type", "application/json").send(b)),
            None => Self::finish(req.send_empty()),
        }
    }

    pub fn judge(&self, token: &str, item: i64, choice: &str, comment: Option<&str>) -> (u16, Value) {
        let mut body = json!({"item": item, "choice": choice});
        if let Some(c) = comment {
            body["comment"] = json!(c);
        }
        self.post("/api/judgments", Some(token), Some(&body.to_string()))
    }

    /// The raw page (or asset) text and its content type.
    pub fn page(&self, path: &str) -> (u16, String, String) {
        let r = self.agent.get(format!("{}{path}", self.base)).call().unwrap();
        let status = r.status().as_u16();
        let ct = r.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
        (status, ct, r.into_body().read_to_string().unwrap())
    }
}
