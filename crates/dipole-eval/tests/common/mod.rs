//! Shared fixtures of dipole-eval's tests: generations, rubrics and a stub HTTP server on loopback.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::Duration;

use dipole_eval::{Generation, Rubric};
use serde_json::Value;

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub fn generation(index: usize, policy: &str, reference: &str) -> Generation {
    Generation { index, prompt: format!("prompt {index}"), policy: policy.into(), reference: reference.into() }
}

/// The rubric of a shipping question.
pub fn shipping() -> Rubric {
    Rubric { facts: vec!["3 to 5 business days".into()], wrong_facts: vec!["10 to 14 business days".into()] }
}

/// One request as the stub server read it.
#[derive(Debug)]
pub struct Seen {
    /// Request line and headers.
    pub head: String,
    pub body: Value,
}

impl Seen {
    /// A header's value (names are case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

/// Reads one HTTP request (head and `Content-Length` body); `None` when the client closed first.
fn read_request(stream: &mut TcpStream) -> Option<Seen> {
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(split) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&raw[..split]).to_string();
            let mut seen = Seen { head, body: Value::Null };
            let len: usize = seen.header("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
            while raw.len() < split + 4 + len {
                let n = stream.read(&mut buf).ok()?;
                if n == 0 {
                    return None;
                }
                raw.extend_from_slice(&buf[..n]);
            }
            seen.body = serde_json::from_slice(&raw[split + 4..split + 4 + len]).unwrap_or(Value::Null);
            return Some(seen);
        }
        let n = stream.read(&mut buf).ok()?;
        if n == 0 {
            return None;
        }
        raw.extend_from_slice(&buf[..n]);
    }
}

/// A raw `200 OK` response with a JSON body.
pub fn ok_json(body: &str) -> String {
    format!("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len())
}

/// The same body sent with `Transfer-Encoding: chunked`, in two chunks.
pub fn ok_chunked(body: &str) -> String {
    let (a, b) = body.split_at(body.len() / 2);
    format!("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{a}\r\n{:x}\r\n{b}\r\n0\r\n\r\n", a.len(), b.len())
}

/// A chat completion whose first message says `content`.
pub fn completion(content: &str) -> String {
    serde_json::json!({"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}).to_string()
}

/// Serves the raw HTTP `responses`, one per request, in order (over as many connections as the
/// client opens); returns the base URL (`http://127.0.0.1:PORT/v1`) and the requests it read.
pub fn stub_server(responses: Vec<String>) -> (String, JoinHandle<Vec<Seen>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    let handle = std::thread::spawn(move || {
        let mut seen = Vec::new();
        let mut conn: Option<TcpStream> = None;
        for response in responses {
            let request = loop {
                let stream = match conn.as_mut() {
                    Some(s) => s,
                    None => conn.insert(listener.accept().unwrap().0),
                };
                stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                match read_request(stream) {
                    Some(r) => break r,
                    // the client closed this connection: it comes back on a new one
                    None => conn = None,
                }
            };
            seen.push(request);
            let stream = conn.as_mut().unwrap();
            stream.write_all(response.as_bytes()).unwrap();
            stream.flush().unwrap();
        }
        seen
    });
    (url, handle)
}

/// Accepts one connection, reads the request and never answers, until the client hangs up.
pub fn silent_server() -> (String, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    let handle = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let _ = read_request(&mut stream);
        let mut buf = [0u8; 64];
        while matches!(stream.read(&mut buf), Ok(n) if n > 0) {}
    });
    (url, handle)
}

/// A loopback address nothing listens on.
pub fn closed_port_url(scheme: &str) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    format!("{scheme}://{addr}/v1")
}
