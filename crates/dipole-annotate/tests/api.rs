//! The JSON API against an in-process server on 127.0.0.1: authentication, the shown order, judge,
//! undo, per-item completion, statistics, and a 4xx JSON error (never a panic) for bad requests.

mod common;

use common::{Client, start_server, write_candidates};
use serde_json::Value;

fn error_of(v: &Value) -> &str {
    v["error"].as_str().unwrap_or_else(|| panic!("no JSON error in {v}"))
}

#[test]
fn bad_requests_get_4xx_json_errors() {
    let dir = tempfile::tempdir().unwrap();
    let data = write_candidates(dir.path(), 3);
    let (base, people) = start_server(&dir.path().join("a.sqlite"), &data, 2, &["alice", "bob"]);
    let c = Client::new(&base);
    let alice = people[0].1.as_str();

    let (s, v) = c.get("/api/next", None);
    assert_eq!((s, error_of(&v)), (401, "missing \"Authorization: Bearer TOKEN\" header"));
    let (s, v) = c.get("/api/next", Some("0123456789abcdef0123456789abcdef"));
    assert_eq!((s, error_of(&v)), (401, "unknown token"));
    let (s, v) = c.get("/api/stats", None);
    assert_eq!(s, 401, "{v}");

    let cases = [
        ("not json", 400, "invalid judgment: expected"),
        ("{\"item\": 1}", 400, "missing field `choice`"),
        ("{\"item\": \"one\", \"choice\": \"a\"}", 400, "invalid type: string \"one\", expected i64"),
        ("{\"item\": 1, \"choice\": \"left\"}", 400, "unknown variant `left`, expected one of `a`, `b`, `tie`"),
        ("{\"item\": 1, \"choice\": \"a\", \"extra\": 1}", 400, "unknown field `extra`"),
        ("{\"item\": 99, \"choice\": \"a\"}", 404, "no item 99"),
    ];
    for (body, status, want) in cases {
        let (s, v) = c.post("/api/judgments", Some(alice), Some(body));
        assert_eq!(s, status, "{body}: {v}");
        assert!(error_of(&v).contains(want), "{body}: {v} lacks {want:?}");
    }
    let long = "x".repeat(10_001);
    let (s, v) = c.judge(alice, 1, "a", Some(&long));
    assert_eq!(s, 400, "{v}");
    assert!(error_of(&v).contains("comment is longer than 10000 characters"));

    let (s, v) = c.post("/api/undo", Some(alice), None);
    assert_eq!((s, error_of(&v)), (404, "alice has no judgment to undo"));
    assert_eq!(c.judge(alice, 1, "a", None).0, 200);
    let (s, v) = c.judge(alice, 1, "b", None);
    assert_eq!((s, error_of(&v)), (409, "alice has already judged item 1: undo it first to change the choice"));

    let (s, v) = c.get("/api/nope", Some(alice));
    assert_eq!((s, error_of(&v)), (404, "no such route: GET /api/nope"));
    let (s, v) = c.post("/api/next", Some(alice), None);
    assert_eq!((s, error_of(&v)), (405, "/api/next does not take POST"));
    // nothing above took the server down
    assert_eq!(c.get("/api/me", Some(alice)).0, 200);
}

#[test]
fn judging_undo_completion_and_stats() {
    let dir = tempfile::tempdir().unwrap();
    let data = write_candidates(dir.path(), 4);
    let (base, people) = start_server(&dir.path().join("a.sqlite"), &data, 2, &["alice", "bob", "carol"]);
    let c = Client::new(&base);
    let token = |i: usize| people[i].1.as_str();

    // the order shown is fixed per item and annotator: asking again shows the same sides
    let (s, first) = c.get("/api/next", Some(token(0)));
    assert_eq!(s, 200);
    assert_eq!(first["item"], 1);
    assert_eq!(first["prompt"], "Question 1?");
    assert_eq!(c.get("/api/next", Some(token(0))).1, first);
    for who in 0..3 {
        let (_, v) = c.get("/api/next", Some(token(who)));
        let pair = [v["a"].as_str().unwrap().to_string(), v["b"].as_str().unwrap().to_string()];
        assert!(pair.contains(&"good answer 1".to_string()) && pair.contains(&"bad answer 1".to_string()));
    }

    // alice picks the good answer whichever side it is on; the stored vote is the first response
    let side_of = |v: &Value, text: &str| if v["a"] == text { "a" } else { "b" };
    let (s, v) = c.judge(token(0), 1, side_of(&first, "good answer 1"), Some("  clearer  "));
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["judgment"]["vote"], "first");
    assert_eq!(v["judgment"]["comment"], "clearer");
    assert_eq!(v["progress"]["judged"], 1);

    // alice next gets item 2; undo brings item 1 back as she saw it, and it can be judged again
    assert_eq!(c.get("/api/next", Some(token(0))).1["item"], 2);
    let (s, v) = c.post("/api/undo", Some(token(0)), None);
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["undone"]["item"], 1);
    assert_eq!(v["shown"], first);
    assert_eq!(c.get("/api/judgments", Some(token(0))).1, Value::Array(vec![]));
    assert_eq!(c.judge(token(0), 1, side_of(&first, "bad answer 1"), None).1["judgment"]["vote"], "second");

    // bob gets item 1 first (closest to done); with alice and bob on it, item 1 is done at per_item 2
    let (_, b1) = c.get("/api/next", Some(token(1)));
    assert_eq!(b1["item"], 1);
    assert_eq!(c.judge(token(1), 1, "tie", None).1["judgment"]["vote"], "tie");
    assert_eq!(c.get("/api/next", Some(token(2))).1["item"], 2, "item 1 is done, carol starts on 2");

    // everyone judges everything left; then nothing is left: 204 with no body
    for who in 0..3 {
        loop {
            let (s, v) = c.get("/api/next", Some(token(who)));
            if s == 204 {
                assert_eq!(v, Value::Null);
                break;
            }
            let item = v["item"].as_i64().unwrap();
            assert_eq!(c.judge(token(who), item, side_of(&v, &format!("good answer {item}")), None).0, 200);
        }
    }
    let (s, stats) = c.get("/api/stats", Some(token(2)));
    assert_eq!(s, 200);
    assert_eq!((stats["items"].as_u64(), stats["done"].as_u64(), stats["judgments"].as_u64()), (Some(4), Some(4), Some(8)));
    let judged: Vec<u64> = stats["annotators"].as_array().unwrap().iter().map(|a| a["judged"].as_u64().unwrap()).collect();
    assert_eq!(judged.iter().sum::<u64>(), 8);
    assert_eq!(stats["pairs"].as_array().unwrap().len(), 3);
    assert!(stats["fleiss_kappa"].is_number() || stats["fleiss_kappa"].is_null());
    let (_, me) = c.get("/api/me", Some(token(0)));
    assert_eq!((me["name"].as_str(), me["left"].as_u64(), me["per_item"].as_u64()), (Some("alice"), Some(0), Some(2)));
}

#[test]
fn pages_and_assets_are_embedded() {
    let dir = tempfile::tempdir().unwrap();
    let data = write_candidates(dir.path(), 1);
    let (base, _) = start_server(&dir.path().join("a.sqlite"), &data, 1, &["alice"]);
    let c = Client::new(&base);
    for (path, ct, has) in [
        ("/", "text/html", "/assets/app.js"),
        ("/stats", "text/html", "/assets/stats.js"),
        ("/assets/app.js", "text/javascript", "/api/judgments"),
        ("/assets/stats.js", "text/javascript", "/api/stats"),
        ("/assets/style.css", "text/css", ".responses"),
    ] {
        let (s, got_ct, body) = c.page(path);
        assert_eq!(s, 200, "{path}");
        assert!(got_ct.starts_with(ct), "{path}: {got_ct}");
        assert!(body.contains(has), "{path} lacks {has}");
        // nothing from elsewhere: no CDN, no absolute URL to load
        assert!(!body.contains("https://") && !body.contains("http://"), "{path} refers to another site");
    }
}
