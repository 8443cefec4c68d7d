//! The LLM judge: any OpenAI-compatible `/chat/completions` endpoint, over `http://` or `https://`
//! (a local vLLM, llama.cpp or Ollama server, or a hosted API), one request per prompt.

use std::time::Duration;

use dipole_data::generation::Generation;
use serde::Deserialize;
use serde_json::Value;

use crate::error::{EvalError, JudgeFailure, Result, excerpt};
use crate::report::{JudgeReport, PromptVerdict, Rubric, Verdict, summarise};

/// The instructions the LLM judge gets; its reply must be the JSON object described.
pub const JUDGE_SYSTEM_PROMPT: &str = "You grade customer-support answers. You get a customer's message, optionally the facts a correct answer must state, and two answers A and B. For each answer decide: accurate (it states the correct information and nothing false), empathetic (warm, polite, acknowledges the customer), refusal (it declines to help although the request is legitimate). Then say which answer is better overall, accuracy first, then tone. Reply with only this JSON object: {\"A\": {\"accurate\": true|false, \"empathetic\": true|false, \"refusal\": true|false}, \"B\": {\"accurate\": true|false, \"empathetic\": true|false, \"refusal\": true|false}, \"better\": \"A\"|\"B\"|\"tie\"}";

/// Characters of a response body or reply quoted in an error.
const EXCERPT: usize = 300;
/// The most bytes of a response read.
const MAX_RESPONSE: u64 = 16 << 20;

/// An LLM judge behind an OpenAI-compatible chat endpoint.
#[derive(Clone, Debug)]
pub struct LlmJudge {
    /// `http(s)://host:port/v1` or the full `.../chat/completions` URL.
    pub url: String,
    /// The `model` of each request.
    pub model: String,
    /// Sent as `Authorization: Bearer ...` when set.
    pub api_key: Option<String>,
    /// The longest one request may take, connecting and reading the reply included.
    pub timeout: Duration,
}

#[derive(Deserialize)]
struct LlmVerdict {
    accurate: bool,
    empathetic: bool,
    refusal: bool,
}

#[derive(Deserialize)]
struct LlmReply {
    #[serde(rename = "A")]
    a: LlmVerdict,
    #[serde(rename = "B")]
    b: LlmVerdict,
    better: String,
}

impl LlmJudge {
    /// The chat-completions URL requests go to.
    pub fn endpoint(&self) -> String {
        let base = self.url.trim_end_matches('/');
        if base.ends_with("/chat/completions") { base.to_string() } else { format!("{base}/chat/completions") }
    }

    /// The chat request for one prompt; `trained_first` puts the trained answer in slot A.
    pub fn request(&self, g: &Generation, rubric: Option<&Rubric>, trained_first: bool) -> Value {
        let (a, b) = if trained_first { (&g.policy, &g.reference) } else { (&g.reference, &g.policy) };
        let facts = rubric.map_or_else(String::new, |r| format!("Facts a correct answer states: {}\n\n", r.facts.join("; ")));
        let user = format!("Customer message:\n{}\n\n{facts}Answer A:\n{a}\n\nAnswer B:\n{b}", g.prompt);
        serde_json::json!({
            "model": self.model,
            "temperature": 0,
            "messages": [
                {"role": "system", "content": JUDGE_SYSTEM_PROMPT},
                {"role": "user", "content": user},
            ],
        })
    }

    /// Parses the judge's message (the first `{` to the last `}` of it) into (trained, base)
    /// verdicts and the trained answer's win.
    pub fn parse(reply: &str, trained_first: bool) -> Result<(Verdict, Verdict, f64), JudgeFailure> {
        let bad = |reason: String| JudgeFailure::BadVerdict { reason, reply: excerpt(reply, EXCERPT) };
        let (Some(start), Some(end)) = (reply.find('{'), reply.rfind('}')) else {
            return Err(bad("no JSON object in the reply".into()));
        };
        if end < start {
            return Err(bad("no JSON object in the reply".into()));
        }
        let parsed: LlmReply = serde_json::from_str(&reply[start..=end]).map_err(|e| bad(format!("not the expected JSON object ({e})")))?;
        let verdict = |v: &LlmVerdict| Verdict { factual: Some(v.accurate), empathetic: v.empathetic, refusal: v.refusal };
        let (a, b) = (verdict(&parsed.a), verdict(&parsed.b));
        let a_wins = match parsed.better.trim().to_ascii_uppercase().as_str() {
            "A" => 1.0,
            "B" => 0.0,
            "TIE" => 0.5,
            other => return Err(bad(format!("better = {other:?}; expected \"A\", \"B\" or \"tie\""))),
        };
        Ok(if trained_first { (a, b, a_wins) } else { (b, a, 1.0 - a_wins) })
    }

    /// Judges every generation, one request each (the answer order alternates to cancel position
    /// bias); `rubrics[g.index]` gives the judge the facts of a row. Stops at the first failure,
    /// naming the URL and the prompt.
    pub fn judge(&self, generations: &[Generation], rubrics: &[Option<Rubric>]) -> Result<(JudgeReport, Vec<PromptVerdict>)> {
        let endpoint = self.endpoint();
        let agent = self.agent();
        let mut verdicts = Vec::with_capacity(generations.len());
        for (k, g) in generations.iter().enumerate() {
            let fail = |failure| EvalError::Judge { url: endpoint.clone(), prompt: g.index, failure };
            let rubric = rubrics.get(g.index).and_then(|r| r.as_ref());
            let trained_first = k % 2 == 0;
            let content = self.chat(&agent, &endpoint, &self.request(g, rubric, trained_first)).map_err(fail)?;
            let (trained, base, win) = Self::parse(&content, trained_first).map_err(fail)?;
            verdicts.push(PromptVerdict { index: g.index, trained, base, win });
        }
        Ok((summarise(&format!("LLM ({})", self.model), &verdicts), verdicts))
    }

    fn agent(&self) -> ureq::Agent {
        let config = ureq::Agent::config_builder()
            .timeout_global(Some(self.timeout))
            // statuses are read here, to quote the body of an error
            .http_status_as_error(false)
            .user_agent(concat!("dipole-eval/", env!("CARGO_PKG_VERSION")))
            .build();
        ureq::Agent::new_with_config(config)
    }

    /// POSTs one chat request and returns the message content of the first choice.
    fn chat(&self, agent: &ureq::Agent, endpoint: &str, body: &Value) -> Result<String, JudgeFailure> {
        let mut request = agent.post(endpoint).header("Accept", "application/json").content_type("application/json");
        if let Some(key) = &self.api_key {
            request = request.header("Authorization", format!("Bearer {key}"));
        }
        let failure = |e: ureq::Error| match e {
            ureq::Error::Timeout(_) => JudgeFailure::Timeout(self.timeout),
            ureq::Error::Io(io) if matches!(io.kind(), std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock) => {
                JudgeFailure::Timeout(self.timeout)
            }
            other => JudgeFailure::Request(other.to_string()),
        };
        let mut response = request.send(body.to_string()).map_err(failure)?;
        let status = response.status().as_u16();
        let bytes = response.body_mut().with_config().limit(MAX_RESPONSE).read_to_vec().map_err(failure)?;
        let text = String::from_utf8_lossy(&bytes);
        if !(200..300).contains(&status) {
            return Err(JudgeFailure::Status { status, body: excerpt(text.trim(), EXCERPT) });
        }
        let bad = |reason: String| JudgeFailure::BadResponse { reason, body: excerpt(text.trim(), EXCERPT) };
        let json: Value = serde_json::from_str(&text).map_err(|e| bad(format!("not JSON: {e}")))?;
        match json.pointer("/choices/0/message/content").and_then(Value::as_str) {
            Some(content) => Ok(content.to_string()),
            None => Err(bad("no choices[0].message.content".into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_takes_a_base_or_the_full_url() {
        let judge = |url: &str| LlmJudge { url: url.into(), model: "m".into(), api_key: None, timeout: Duration::from_secs(1) };
        assert_eq!(judge("http://localhost:8000/v1").endpoint(), "http://localhost:8000/v1/chat/completions");
        assert_eq!(judge("https://api.example.com/v1/").endpoint(), "https://api.example.com/v1/chat/completions");
        assert_eq!(judge("http://h/v1/chat/completions").endpoint(), "http://h/v1/chat/completions");
    }
}
