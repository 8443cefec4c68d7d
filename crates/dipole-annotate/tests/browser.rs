//! The page in a real browser: headless Chromium, driven over the DevTools protocol (a websocket),
//! loads the page, shows a multi-turn prompt, takes a comment, makes choices with the keys 1 / 2 / 3,
//! undoes one with u, and reaches "all done"; the test then reads the recorded judgments through the
//! API, checks each picked the response that was on the side pressed, and saves a screenshot.
//!
//! Chromium must be installed (`apt-get install -y chromium`; `.ci/run` does it): without it this
//! test fails, saying so. `CHROMIUM=/path/to/chrome` picks another binary.
//!
//! The screenshot goes to `$CARGO_TARGET_TMPDIR/annotate.png`, and to `docs/annotate.png` (the
//! README's) when that file is missing or `DIPOLE_UPDATE_SCREENSHOT=1` is set.

mod common;

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use base64::Engine;
use common::{Client, start_server};
use serde_json::{Value, json};
use tungstenite::stream::MaybeTlsStream;
use tungstenite::{Message, WebSocket};

fn chromium() -> PathBuf {
    if let Some(p) = std::env::var_os("CHROMIUM") {
        return PathBuf::from(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        for name in ["chromium", "chromium-browser", "google-chrome", "google-chrome-stable"] {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    panic!(
        "headless Chromium is needed for the browser test and was not found on PATH: install it with \
         `sudo apt-get install -y chromium` (Debian/Ubuntu; .ci/run does this), or set CHROMIUM=/path/to/chrome"
    );
}

/// A headless Chromium and one page of it, attached over a flattened DevTools session.
struct Browser {
    child: Child,
    ws: WebSocket<MaybeTlsStream<TcpStream>>,
    id: u64,
    session: Option<String>,
    _profile: tempfile::TempDir,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Browser {
    fn launch(width: u32, height: u32) -> Browser {
        let profile = tempfile::tempdir().unwrap();
        let mut child = Command::new(chromium())
            .args(["--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--no-default-browser-check"])
            .args(["--disable-extensions", "--disable-background-networking", "--disable-sync", "--hide-scrollbars", "--mute-audio"])
            .arg("--remote-debugging-port=0")
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg(format!("--window-size={width},{height}"))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", chromium().display()));
        // Chromium prints its DevTools address on stderr; keep draining stderr after that
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(url) = line.strip_prefix("DevTools listening on ") {
                    let _ = tx.send(url.trim().to_string());
                }
            }
        });
        let url = rx.recv_timeout(Duration::from_secs(30)).expect("Chromium printed its DevTools address within 30 s");
        let (ws, _) = tungstenite::connect(url.as_str()).expect("DevTools websocket");
        if let MaybeTlsStream::Plain(stream) = ws.get_ref() {
            stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        }
        let mut browser = Browser { child, ws, id: 0, session: None, _profile: profile };
        let target = browser.call("Target.createTarget", json!({"url": "about:blank"}));
        let attached = browser.call("Target.attachToTarget", json!({"targetId": target["targetId"], "flatten": true}));
        browser.session = Some(attached["sessionId"].as_str().unwrap().to_string());
        browser.call("Page.enable", json!({}));
        browser.call("Emulation.setDeviceMetricsOverride", json!({"width": width, "height": height, "deviceScaleFactor": 1, "mobile": false}));
        browser
    }

    /// One DevTools command; events in between are skipped.
    fn call(&mut self, method: &str, params: Value) -> Value {
        self.id += 1;
        let mut msg = json!({"id": self.id, "method": method, "params": params});
        if let Some(s) = &self.session {
            msg["sessionId"] = json!(s);
        }
        self.ws.send(Message::text(msg.to_string())).unwrap();
        loop {
            let reply = self.ws.read().unwrap_or_else(|e| panic!("{method}: no reply: {e}"));
            let Message::Text(text) = reply else { continue };
            let v: Value = serde_json::from_str(text.as_str()).unwrap();
            if v["id"] == json!(self.id) {
                assert!(v.get("error").is_none(), "{method}: {}", v["error"]);
                return v["result"].clone();
            }
        }
    }

    fn eval(&mut self, expression: &str) -> Value {
        let r = self.call("Runtime.evaluate", json!({"expression": expression, "returnByValue": true, "awaitPromise": true}));
        assert!(r.get("exceptionDetails").is_none(), "{expression}: {}", r["exceptionDetails"]);
        r["result"]["value"].clone()
    }

    /// Waits until `expression` is true (10 s at most); while a page loads it may throw (no body yet).
    fn wait_for(&mut self, expression: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let guarded = format!("(() => {{ try {{ return ({expression}) === true; }} catch (e) {{ return false; }} }})()");
        while self.eval(&guarded) != json!(true) {
            if Instant::now() > deadline {
                let state = self.eval("document.body ? document.body.dataset.state + ' / ' + document.getElementById('message').textContent : 'no body'");
                panic!("timed out waiting for {expression} (page: {state})");
            }
            std::thread::sleep(Duration::from_millis(40));
        }
    }

    fn navigate(&mut self, url: &str) {
        self.call("Page.navigate", json!({"url": url}));
    }

    /// A key press as the keyboard sends it: keyDown (with its text) then keyUp.
    fn press(&mut self, key: &str) {
        let (code, vk, text) = match key {
            "Escape" => ("Escape".to_string(), 27, None),
            k if k.chars().all(|c| c.is_ascii_digit()) => (format!("Digit{k}"), 48 + k.parse::<u32>().unwrap(), Some(k)),
            k => (format!("Key{}", k.to_ascii_uppercase()), k.to_ascii_uppercase().chars().next().unwrap() as u32, Some(k)),
        };
        let mut down = json!({"type": "keyDown", "key": key, "code": code, "windowsVirtualKeyCode": vk});
        if let Some(t) = text {
            down["text"] = json!(t);
        }
        self.call("Input.dispatchKeyEvent", down);
        self.call("Input.dispatchKeyEvent", json!({"type": "keyUp", "key": key, "code": code, "windowsVirtualKeyCode": vk}));
    }

    fn screenshot(&mut self) -> Vec<u8> {
        let r = self.call("Page.captureScreenshot", json!({"format": "png"}));
        base64::engine::general_purpose::STANDARD.decode(r["data"].as_str().unwrap()).unwrap()
    }
}

/// Conversational candidates from a customer-support assistant: (prompt, first, second).
fn candidates() -> Vec<(Value, String, String)> {
    let system = json!({"role": "system", "content": "You are the support assistant of Northwind Outfitters. Be accurate and brief."});
    vec![
        (
            json!([system, {"role": "user", "content": "Hi, my order hasn't arrived yet."},
                   {"role": "assistant", "content": "Sorry to hear that! Could you give me your order number?"},
                   {"role": "user", "content": "It's NW-20431. It was supposed to come on Monday."}]),
            "Thanks! Order NW-20431 left our warehouse on Friday and the carrier shows a one-day delay: it should \
             arrive tomorrow. If it hasn't come by Thursday, reply here and I'll send a replacement at no cost."
                .to_string(),
            "Orders usually arrive in 3-5 business days. Please wait a little longer.".to_string(),
        ),
        (json!([system, {"role": "user", "content": "Can I return boots I've worn outside once?"}]),
         "Yes, within 30 days if they are clean and undamaged; start the return from your account page.".to_string(),
         "No returns on footwear.".to_string()),
        (json!([system, {"role": "user", "content": "Do you ship to Norway?"}]),
         "Yes: 5-8 business days, duties paid at checkout.".to_string(),
         "We ship worldwide!".to_string()),
        (json!([system, {"role": "user", "content": "What's your phone number?"}]),
         "You can call us at +1 555 0100, weekdays 8am-6pm ET.".to_string(),
         "Please use the contact form.".to_string()),
    ]
}

fn write_candidates(dir: &Path) -> PathBuf {
    let path = dir.join("support.jsonl");
    let text: String = candidates()
        .iter()
        .map(|(p, a, b)| {
            format!("{}\n", json!({"prompt": p, "responses": [[{"role": "assistant", "content": a}], [{"role": "assistant", "content": b}]]}))
        })
        .collect();
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn the_page_records_keyboard_choices_in_a_real_browser() {
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let data = write_candidates(dir.path());
    let (base, people) = start_server(&dir.path().join("round.sqlite"), &data, 1, &["alice"]);
    let token = people[0].1.clone();
    let mut b = Browser::launch(1100, 760);
    b.navigate(&format!("{base}/?token={token}"));
    b.wait_for("document.body.dataset.state === 'ready'");

    // the prompt is a conversation: system, user, assistant, user
    let roles = b.eval("[...document.querySelectorAll('#prompt .msg .role')].map(e => e.textContent).join(',')");
    assert_eq!(roles, "system,user,assistant,user");
    assert_eq!(b.eval("document.getElementById('who').textContent"), "alice");
    let a_text = |b: &mut Browser| b.eval("document.querySelector('#a .text').textContent").as_str().unwrap().to_string();
    let item_id = |b: &mut Browser| b.eval("document.getElementById('task').dataset.item").as_str().unwrap().to_string();
    let first_a = a_text(&mut b);
    assert_eq!(item_id(&mut b), "1");

    // a reload shows the same item with the same sides
    b.eval("document.body.dataset.state = 'reloading'");
    b.call("Page.reload", json!({}));
    b.wait_for("document.body.dataset.state === 'ready'");
    assert_eq!((item_id(&mut b), a_text(&mut b)), ("1".to_string(), first_a.clone()));

    // c focuses the comment box; typing there types (a 1 is text, not a choice); Esc leaves it
    b.press("c");
    b.call("Input.insertText", json!({"text": "Gives a date and "}));
    b.press("1");
    b.call("Input.insertText", json!({"text": " clear fallback."}));
    b.press("Escape");
    let comment = "Gives a date and 1 clear fallback.";
    assert_eq!(b.eval("document.getElementById('comment').value"), comment);
    assert_eq!(item_id(&mut b), "1", "a key typed into the comment is not a choice");
    let png = b.screenshot();

    // choices by key: 1 (A) on item 1, 2 (B) on item 2, 3 (tie) on item 3, u undoes it, 2 on item 3, 1 on item 4
    let mut shown_a = vec![first_a];
    for (key, want_next) in [("1", "2"), ("2", "3"), ("3", "4"), ("u", "3"), ("2", "4")] {
        b.press(key);
        b.wait_for(&format!("document.getElementById('task').dataset.item === '{want_next}' && document.body.dataset.state === 'ready'"));
        if key != "u" && shown_a.len() < want_next.parse().unwrap() {
            shown_a.push(a_text(&mut b));
        }
    }
    assert!(b.eval("document.getElementById('message').textContent").as_str().unwrap().contains("Recorded B for item 3"));
    shown_a.push(a_text(&mut b));
    b.press("1");
    b.wait_for("document.body.dataset.state === 'done'");
    assert_eq!(b.eval("document.getElementById('progress').textContent"), "4 judged · 0 left");

    // the judgments as recorded: side pressed, and the response on that side
    let c = Client::new(&base);
    let (status, judgments) = c.get("/api/judgments", Some(&token));
    assert_eq!(status, 200);
    let judgments = judgments.as_array().unwrap();
    let got: Vec<(i64, &str)> = judgments.iter().map(|j| (j["item"].as_i64().unwrap(), j["choice"].as_str().unwrap())).collect();
    assert_eq!(got, vec![(1, "a"), (2, "b"), (3, "b"), (4, "a")]);
    assert_eq!(judgments[0]["comment"], comment);
    let cands = candidates();
    for (j, a) in judgments.iter().zip(&shown_a) {
        let i = j["item"].as_u64().unwrap() as usize - 1;
        let first_on_left = *a == cands[i].1;
        assert!(first_on_left || *a == cands[i].2, "item {}: A showed {a:?}", i + 1);
        let picked_first = (j["choice"] == "a") == first_on_left;
        assert_eq!(j["vote"], if picked_first { "first" } else { "second" }, "item {}", i + 1);
    }

    // the stats page shows the same numbers
    b.navigate(&format!("{base}/stats?token={token}"));
    b.wait_for("document.body.dataset.state === 'ready'");
    assert_eq!(b.eval("document.querySelector('#annotators tbody td:nth-child(2)').textContent"), "4");
    assert!(b.eval("document.getElementById('summary').textContent").as_str().unwrap().starts_with("4 of 4 items done"));

    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    assert!(png.len() < 200_000, "screenshot is {} bytes", png.len());
    std::fs::write(Path::new(env!("CARGO_TARGET_TMPDIR")).join("annotate.png"), &png).unwrap();
    let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/annotate.png");
    if !docs.exists() || std::env::var_os("DIPOLE_UPDATE_SCREENSHOT").is_some() {
        std::fs::write(&docs, &png).unwrap();
    }
    assert!(started.elapsed() < Duration::from_secs(30), "the browser test took {:?}", started.elapsed());
}
