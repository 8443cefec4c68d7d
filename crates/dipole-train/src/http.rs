//! A small blocking HTTP/1.1 client for JSON POSTs (the LLM judge's chat endpoint). Plain HTTP only,
//! which covers local OpenAI-compatible servers; it keeps TLS out of the build.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use serde_json::Value;

/// `(host, port, path)` of an `http://` URL.
fn split_url(url: &str) -> Result<(String, u16, String), String> {
    let rest = match url.strip_prefix("http://") {
        Some(rest) => rest,
        None if url.starts_with("https://") => {
            return Err(format!(
                "{url}: https is not supported by dipole's built-in client; point --judge-url at a plain-HTTP \
                 OpenAI-compatible server (vLLM, llama.cpp, Ollama) or a local relay"
            ));
        }
        None => return Err(format!("{url}: expected an http:// URL")),
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], rest[i..].to_string()),
        None => (rest, "/".to_string()),
    };
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) => (h.to_string(), p.parse().map_err(|_| format!("{url}: bad port {p:?}"))?),
        None => (authority.to_string(), 80),
    };
    if host.is_empty() {
        return Err(format!("{url}: no host"));
    }
    Ok((host, port, path))
}

/// Decodes a `Transfer-Encoding: chunked` body.
fn dechunk(mut body: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let line_end = body.windows(2).position(|w| w == b"\r\n").ok_or("truncated chunked body")?;
        let size_text = std::str::from_utf8(&body[..line_end]).map_err(|_| "bad chunk size")?;
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| format!("bad chunk size {size_text:?}"))?;
        body = &body[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        if body.len() < size {
            return Err("truncated chunk".into());
        }
        out.extend_from_slice(&body[..size]);
        body = body.get(size + 2..).unwrap_or(&[]);
    }
}

/// POSTs `body` as JSON and returns the JSON response; a non-2xx status is an error with the body.
pub fn post_json(url: &str, body: &Value, bearer: Option<&str>, timeout: Duration) -> Result<Value, String> {
    let (host, port, path) = split_url(url)?;
    let addr = (host.as_str(), port)
        .to_socket_addrs()
        .map_err(|e| format!("{url}: {e}"))?
        .next()
        .ok_or_else(|| format!("{url}: host not found"))?;
    let mut stream = TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("{url}: {e}"))?;
    stream.set_read_timeout(Some(timeout)).map_err(|e| e.to_string())?;
    stream.set_write_timeout(Some(timeout)).map_err(|e| e.to_string())?;
    let payload = serde_json::to_vec(body).map_err(|e| e.to_string())?;
    let auth = bearer.map_or_else(String::new, |k| format!("Authorization: Bearer {k}\r\n"));
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\nAccept: application/json\r\n{auth}Content-Length: {}\r\nConnection: close\r\n\r\n",
        payload.len()
    );
    stream.write_all(head.as_bytes()).and_then(|_| stream.write_all(&payload)).map_err(|e| format!("{url}: {e}"))?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).map_err(|e| format!("{url}: reading the response: {e}"))?;
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").ok_or_else(|| format!("{url}: malformed HTTP response"))?;
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let mut body = raw[split + 4..].to_vec();
    let status: u16 = head
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("{url}: malformed status line"))?;
    let header = |name: &str| {
        head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim().to_ascii_lowercase())
        })
    };
    if header("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        body = dechunk(&body).map_err(|e| format!("{url}: {e}"))?;
    } else if let Some(n) = header("content-length").and_then(|v| v.parse::<usize>().ok()) {
        body.truncate(n);
    }
    let text = String::from_utf8_lossy(&body);
    if !(200..300).contains(&status) {
        return Err(format!("{url}: HTTP {status}: {}", text.chars().take(500).collect::<String>()));
    }
    serde_json::from_str(&text).map_err(|e| format!("{url}: response is not JSON ({e}): {}", text.chars().take(300).collect::<String>()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_chunked_bodies() {
        assert_eq!(split_url("http://localhost:8000/v1/chat/completions").unwrap(), ("localhost".into(), 8000, "/v1/chat/completions".into()));
        assert_eq!(split_url("http://example").unwrap(), ("example".into(), 80, "/".into()));
        assert!(split_url("https://api.example.com/v1").unwrap_err().contains("https is not supported"));
        assert!(split_url("ftp://x").is_err());
        assert_eq!(dechunk(b"4\r\nWiki\r\n5\r\npedia\r\n0\r\n\r\n").unwrap(), b"Wikipedia");
    }
}
