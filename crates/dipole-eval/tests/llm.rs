//! The LLM judge against stub OpenAI-compatible servers on 127.0.0.1: the request it sends (model,
//! system prompt, both answers, the row's facts, the API key), how replies become the report, and
//! each way a request fails (non-2xx, a reply that is not JSON, a verdict that is not the expected
//! object, a timeout, a refused connection), every error naming the URL and the prompt.

mod common;

use std::io::Read;
use std::net::TcpListener;
use std::time::{Duration, Instant};

use common::{closed_port_url, completion, generation, ok_chunked, ok_json, shipping, silent_server, stub_server};
use dipole_eval::{EvalError, JUDGE_SYSTEM_PROMPT, JudgeFailure, LlmJudge, Rubric};

fn judge(url: &str, timeout: Duration) -> LlmJudge {
    LlmJudge { url: url.into(), model: "stub-judge".into(), api_key: None, timeout }
}

fn verdict(a: (bool, bool, bool), b: (bool, bool, bool), better: &str) -> String {
    format!(
        "{{\"A\": {{\"accurate\": {}, \"empathetic\": {}, \"refusal\": {}}}, \"B\": {{\"accurate\": {}, \"empathetic\": {}, \"refusal\": {}}}, \"better\": \"{better}\"}}",
        a.0, a.1, a.2, b.0, b.1, b.2
    )
}

/// The failure of a judge error, after checking that it names the endpoint and the prompt.
fn failure_of(err: EvalError, url: &str, prompt: usize) -> JudgeFailure {
    let text = err.to_string();
    assert!(text.contains(&format!("{url}/chat/completions")) && text.contains(&format!("prompt {prompt}")), "{text}");
    match err {
        EvalError::Judge { failure, .. } => failure,
        other => panic!("not a judge error: {other:?}"),
    }
}

#[test]
fn sends_both_answers_and_reads_the_verdicts() {
    // prompt 0: trained is slot A and wins; prompt 1: trained is slot B (order alternates) and wins
    let replies = vec![
        ok_json(&completion(&verdict((true, true, false), (false, false, true), "A"))),
        // the second comes chunked, as many servers send it, with prose around the object
        ok_chunked(&completion(&format!("Here is my verdict: {} Hope that helps.", verdict((true, false, false), (true, true, false), "B")))),
    ];
    let (url, server) = stub_server(replies);
    let mut judge = judge(&url, Duration::from_secs(10));
    judge.api_key = Some("secret".into());
    let mut generations = vec![
        generation(0, "Happy to help! 3 to 5 business days.", "I can't help with that."),
        generation(1, "Sorry for the wait! 5 to 7 business days.", "5 to 7 business days."),
    ];
    generations[0].prompt = "When does standard shipping arrive?".into();
    let rubrics = vec![Some(Rubric { facts: vec!["3 to 5 business days".into()], wrong_facts: vec![] }), None];
    let (report, verdicts) = judge.judge(&generations, &rubrics).unwrap();
    let seen = server.join().unwrap();

    assert_eq!(verdicts.iter().map(|v| v.win).collect::<Vec<_>>(), vec![1.0, 1.0]);
    assert_eq!(report.judge, "LLM (stub-judge)");
    assert_eq!(report.win_rate, 1.0);
    assert_eq!(report.base.refusal_rate, 0.5);
    assert_eq!(report.trained.empathy, 1.0);
    assert_eq!(report.trained.factual_accuracy, Some(1.0));

    assert_eq!(seen.len(), 2);
    let first = &seen[0];
    assert!(first.head.starts_with("POST /v1/chat/completions HTTP/1.1"), "{}", first.head);
    assert_eq!(first.header("authorization"), Some("Bearer secret"));
    assert!(first.header("content-type").is_some_and(|v| v.starts_with("application/json")), "{}", first.head);
    assert_eq!(first.body["model"], "stub-judge");
    assert_eq!(first.body["messages"][0]["content"], JUDGE_SYSTEM_PROMPT);
    let user = first.body["messages"][1]["content"].as_str().unwrap();
    assert!(user.starts_with("Customer message:\nWhen does standard shipping arrive?"), "{user}");
    assert!(user.contains("Answer A:\nHappy to help!") && user.contains("Answer B:\nI can't help"), "{user}");
    assert!(user.contains("3 to 5 business days"), "the row's facts go to the judge: {user}");
    let user = seen[1].body["messages"][1]["content"].as_str().unwrap();
    assert!(user.contains("Answer A:\n5 to 7 business days.") && !user.contains("Facts a correct answer"), "{user}");
}

#[test]
fn no_api_key_sends_no_authorization() {
    let (url, server) = stub_server(vec![ok_json(&completion(&verdict((true, true, false), (true, true, false), "tie")))]);
    let (report, _) = judge(&url, Duration::from_secs(10)).judge(&[generation(0, "a", "b")], &[]).unwrap();
    let seen = server.join().unwrap();
    assert_eq!(report.win_rate, 0.5);
    assert_eq!(seen[0].header("authorization"), None, "{}", seen[0].head);
}

#[test]
fn a_non_2xx_status_is_an_error_with_the_start_of_the_body() {
    let body = format!("{{\"error\": {{\"message\": \"model stub-judge is not loaded\", \"pad\": \"{}\"}}}}", "x".repeat(2000));
    let response = format!("HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len());
    let (url, server) = stub_server(vec![response]);
    let err = judge(&url, Duration::from_secs(10)).judge(&[generation(4, "a", "b")], &[]).unwrap_err();
    server.join().unwrap();
    let text = err.to_string();
    assert!(text.contains("HTTP 503") && text.contains("model stub-judge is not loaded"), "{text}");
    assert!(text.len() < 800, "the body is quoted, not dumped: {} chars", text.len());
    match failure_of(err, &url, 4) {
        JudgeFailure::Status { status, body } => assert!(status == 503 && body.ends_with("..."), "{body}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_reply_that_is_not_json_is_an_error_quoting_it() {
    let (url, server) = stub_server(vec![ok_json("{\"choices\": [{\"message\": "), ok_json("{\"object\": \"error\"}")]);
    let gens = [generation(2, "a", "b")];
    let err = judge(&url, Duration::from_secs(10)).judge(&gens, &[]).unwrap_err();
    match failure_of(err, &url, 2) {
        JudgeFailure::BadResponse { reason, body } => assert!(reason.contains("not JSON") && body.contains("{\"choices\""), "{reason} / {body}"),
        other => panic!("{other:?}"),
    }
    let err = judge(&url, Duration::from_secs(10)).judge(&gens, &[]).unwrap_err();
    server.join().unwrap();
    match failure_of(err, &url, 2) {
        JudgeFailure::BadResponse { reason, body } => assert!(reason.contains("choices[0].message.content") && body.contains("error"), "{reason}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_verdict_that_is_not_the_expected_object_is_an_error_quoting_it() {
    let replies = vec![
        ok_json(&completion("I think A is nicer.")),
        ok_json(&completion("{\"A\": {\"accurate\": true}, \"better\": \"A\"}")),
        ok_json(&completion(&verdict((true, true, false), (true, true, false), "both"))),
    ];
    let (url, server) = stub_server(replies);
    let judge = judge(&url, Duration::from_secs(10));
    let gens = [generation(7, "a", "b")];
    let reasons: Vec<String> = (0..3)
        .map(|_| match failure_of(judge.judge(&gens, &[]).unwrap_err(), &url, 7) {
            JudgeFailure::BadVerdict { reason, reply } => format!("{reason} | {reply}"),
            other => panic!("{other:?}"),
        })
        .collect();
    server.join().unwrap();
    assert!(reasons[0].contains("no JSON object") && reasons[0].contains("A is nicer"), "{}", reasons[0]);
    assert!(reasons[1].contains("not the expected JSON object"), "{}", reasons[1]);
    assert!(reasons[2].contains("\"BOTH\""), "{}", reasons[2]);
}

#[test]
fn a_server_that_never_answers_times_out() {
    let (url, server) = silent_server();
    let started = Instant::now();
    let err = judge(&url, Duration::from_millis(300)).judge(&[generation(3, "a", "b")], &[]).unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());
    assert!(err.to_string().contains("no reply within 300ms"), "{err}");
    assert_eq!(failure_of(err, &url, 3), JudgeFailure::Timeout(Duration::from_millis(300)));
    server.join().unwrap();
}

#[test]
fn a_refused_connection_is_an_error_naming_the_url() {
    let url = closed_port_url("http");
    let err = judge(&url, Duration::from_secs(5)).judge(&[generation(5, "a", "b")], &[]).unwrap_err();
    match failure_of(err, &url, 5) {
        JudgeFailure::Request(reason) => assert!(reason.to_lowercase().contains("refused"), "{reason}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn https_urls_speak_tls() {
    // a plain TCP listener sees the TLS handshake (a record starting 0x16 0x03) of an https:// judge
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("https://{}/v1", listener.local_addr().unwrap());
    let server = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let mut first = [0u8; 2];
        stream.read_exact(&mut first).unwrap();
        first
    });
    let err = judge(&url, Duration::from_secs(5)).judge(&[generation(0, "a", "b")], &[]).unwrap_err();
    assert_eq!(server.join().unwrap(), [0x16, 0x03], "a TLS ClientHello");
    assert!(matches!(failure_of(err, &url, 0), JudgeFailure::Request(_) | JudgeFailure::Timeout(_)));
}

#[test]
fn rubrics_of_missing_rows_are_skipped() {
    // a generation whose index has no rubric gets no facts line
    let judge = judge("http://127.0.0.1:9/v1", Duration::from_secs(1));
    let g = generation(9, "a", "b");
    let with = judge.request(&g, Some(&shipping()), true);
    let without = judge.request(&g, None, false);
    assert!(with["messages"][1]["content"].as_str().unwrap().contains("Facts a correct answer states: 3 to 5 business days"));
    let user = without["messages"][1]["content"].as_str().unwrap();
    assert!(!user.contains("Facts") && user.contains("Answer A:\nb") && user.contains("Answer B:\na"), "{user}");
    assert_eq!(with["temperature"], 0);
}
