//! The LLM judge against a stub OpenAI-compatible server on loopback: the request it sends (model,
//! system prompt, both answers, the row's facts, the API key) and how replies become the report.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::time::Duration;

use dipole_train::{Generation, LlmJudge, Rubric};
use serde_json::Value;

/// Serves `replies` (judge message contents) one request each; returns the request bodies and headers.
fn stub_server(replies: Vec<String>) -> (String, std::thread::JoinHandle<Vec<(String, Value)>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    let handle = std::thread::spawn(move || {
        let mut seen = Vec::new();
        for (k, reply) in replies.into_iter().enumerate() {
            let (mut stream, _) = listener.accept().unwrap();
            let mut raw = Vec::new();
            let mut buf = [0u8; 4096];
            let (head, body) = loop {
                let n = stream.read(&mut buf).unwrap();
                raw.extend_from_slice(&buf[..n]);
                if let Some(split) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&raw[..split]).to_string();
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("Content-Length: "))
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap();
                    while raw.len() < split + 4 + len {
                        let n = stream.read(&mut buf).unwrap();
                        raw.extend_from_slice(&buf[..n]);
                    }
                    break (head, serde_json::from_slice::<Value>(&raw[split + 4..split + 4 + len]).unwrap());
                }
            };
            let response = serde_json::json!({"choices": [{"message": {"role": "assistant", "content": reply}}]}).to_string();
            if k % 2 == 0 {
                write!(stream, "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{response}", response.len()).unwrap();
            } else {
                // the second answer comes chunked, as many servers send it
                let (a, b) = response.split_at(response.len() / 2);
                write!(stream, "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{a}\r\n{:x}\r\n{b}\r\n0\r\n\r\n", a.len(), b.len()).unwrap();
            }
            seen.push((head, body));
        }
        seen
    });
    (url, handle)
}

fn verdict(a: (bool, bool, bool), b: (bool, bool, bool), better: &str) -> String {
    format!(
        "{{\"A\": {{\"accurate\": {}, \"empathetic\": {}, \"refusal\": {}}}, \"B\": {{\"accurate\": {}, \"empathetic\": {}, \"refusal\": {}}}, \"better\": \"{better}\"}}",
        a.0, a.1, a.2, b.0, b.1, b.2
    )
}

#[test]
fn llm_judge_sends_both_answers_and_reads_verdicts() {
    // prompt 0: trained is slot A and wins; prompt 1: trained is slot B (order alternates) and wins
    let replies = vec![
        verdict((true, true, false), (false, false, true), "A"),
        format!("Here is my verdict: {}", verdict((true, false, false), (true, true, false), "B")),
    ];
    let (url, server) = stub_server(replies);
    let judge = LlmJudge { url, model: "stub-judge".into(), api_key: Some("secret".into()), timeout: Duration::from_secs(10) };
    let generations = vec![
        Generation { index: 0, prompt: "When does standard shipping arrive?".into(), policy: "Happy to help! 3 to 5 business days.".into(), reference: "I can't help with that.".into() },
        Generation { index: 1, prompt: "Refund?".into(), policy: "Sorry for the wait! 5 to 7 business days.".into(), reference: "5 to 7 business days.".into() },
    ];
    let rubrics = vec![Some(Rubric { facts: vec!["3 to 5 business days".into()], wrong_facts: vec![] }), None];
    let (report, verdicts) = judge.judge(&generations, &rubrics).unwrap();
    let seen = server.join().unwrap();

    assert_eq!(verdicts.iter().map(|v| v.win).collect::<Vec<_>>(), vec![1.0, 1.0]);
    assert_eq!(report.win_rate, 1.0);
    assert_eq!(report.base.refusal_rate, 0.5);
    assert_eq!(report.trained.empathy, 1.0);
    assert_eq!(report.trained.factual_accuracy, Some(1.0));

    let (head, body) = &seen[0];
    assert!(head.starts_with("POST /v1/chat/completions HTTP/1.1"), "{head}");
    assert!(head.contains("Authorization: Bearer secret"), "{head}");
    assert_eq!(body["model"], "stub-judge");
    let user = body["messages"][1]["content"].as_str().unwrap();
    assert!(user.contains("Answer A:\nHappy to help!") && user.contains("Answer B:\nI can't help"), "{user}");
    assert!(user.contains("3 to 5 business days"), "the row's facts go to the judge: {user}");
    let user = seen[1].1["messages"][1]["content"].as_str().unwrap();
    assert!(user.contains("Answer A:\n5 to 7 business days.") && !user.contains("Facts a correct answer"), "{user}");
}

#[test]
fn judge_errors_name_the_prompt_and_the_problem() {
    let (url, server) = stub_server(vec!["I think A is nicer.".into()]);
    let judge = LlmJudge { url, model: "m".into(), api_key: None, timeout: Duration::from_secs(10) };
    let generations = vec![Generation { index: 7, prompt: "p".into(), policy: "a".into(), reference: "b".into() }];
    let err = judge.judge(&generations, &[]).unwrap_err();
    server.join().unwrap();
    assert!(err.contains("prompt 7") && err.contains("no JSON object"), "{err}");

    let closed = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/v1", closed.local_addr().unwrap());
    drop(closed);
    let judge = LlmJudge { url, model: "m".into(), api_key: None, timeout: Duration::from_secs(5) };
    let err = judge.judge(&generations, &[]).unwrap_err();
    assert!(err.contains("prompt 7") && err.contains("127.0.0.1"), "{err}");
}
