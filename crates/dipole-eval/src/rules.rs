//! The rule-based judge: an answer is *factual* when it states every fact of its row's rubric and
//! none of the wrong ones, *empathetic* when it shows empathy the way support answers do (an
//! apology, an acknowledgement, thanks, an offer to help, a kind closing), and a *refusal* when it
//! declines to help. A refusal is neither factual nor empathetic.
//!
//! Facts are matched as case-insensitive substrings (a rubric's phrases are exact). The marker
//! lists below are matched as whole words after lower-casing, with typographic apostrophes read
//! as `'` and punctuation as a word break: `Thank you!` matches "thank you", `thanksgiving` does
//! not match "thanks".

use dipole_data::generation::Generation;

use crate::report::{PromptVerdict, Rubric, Verdict, summarise};

/// The name the rule judge gives its reports.
pub const RULES_JUDGE: &str = "rules";

/// Apologising for the customer's trouble or for a wait.
pub const APOLOGY: &[&str] = &["sorry", "apologies", "apologize", "apologise", "apologizing", "apologising", "we regret", "i regret"];

/// Acknowledging the customer's situation or feelings: showing that the problem was heard.
pub const ACKNOWLEDGEMENT: &[&str] = &[
    "i understand",
    "i completely understand",
    "i totally understand",
    "i fully understand",
    "we understand",
    "i can understand",
    "understandable",
    "i can see why",
    "i can imagine",
    "i know how",
    "i hear you",
    "i see what you mean",
    "how frustrating",
    "sounds frustrating",
    "must be frustrating",
    "i appreciate",
    "we appreciate",
    "good question",
    "great question",
];

/// Thanking the customer (for writing, for waiting, for the details).
pub const GRATITUDE: &[&str] = &["thank you", "thanks", "many thanks", "grateful"];

/// Offering help, now or later: willingness to help and an open door for follow-up questions.
pub const OFFER_OF_HELP: &[&str] = &[
    "happy to help",
    "glad to help",
    "happy to assist",
    "glad to assist",
    "here to help",
    "i'd be happy",
    "i would be happy",
    "i'd be glad",
    "i would be glad",
    "let me help",
    "i can help",
    "i'll help",
    "i will help",
    "let me know",
    "feel free",
    "don't hesitate",
    "do not hesitate",
    "anything else",
    "any other questions",
    "any more questions",
    "any further questions",
    "just ask",
];

/// Wishing the customer well when closing the answer.
pub const WELL_WISHES: &[&str] = &[
    "hope this helps",
    "hope that helps",
    "hope this solves",
    "hope this answers",
    "have a great day",
    "have a good day",
    "have a nice day",
    "have a wonderful day",
    "have a lovely day",
    "have a great weekend",
    "take care",
    "good luck",
    "best wishes",
    "all the best",
];

/// Every empathy marker class, each a list of phrases; an answer with a phrase of any class is
/// empathetic (unless it is a refusal).
pub const EMPATHY: &[&[&str]] = &[APOLOGY, ACKNOWLEDGEMENT, GRATITUDE, OFFER_OF_HELP, WELL_WISHES];

/// How an answer says it cannot or will not act; a refusal when an action of
/// [`REFUSED_ACTIONS`] follows (`can't` + `help`, `unable to` + `assist`, ...).
pub const INABILITY: &[&str] = &[
    "can't",
    "cant",
    "cannot",
    "can not",
    "couldn't",
    "could not",
    "won't",
    "will not",
    "unable to",
    "not able to",
    "won't be able to",
    "will not be able to",
    "not allowed to",
    "not permitted to",
    "not authorized to",
    "not authorised to",
    "not in a position to",
];

/// What a refusal declines to do: help with, or talk about, the customer's request.
pub const REFUSED_ACTIONS: &[&str] = &[
    "help",
    "assist",
    "discuss",
    "answer",
    "support you",
    "talk about",
    "comment on",
    "look into",
    "provide help",
    "provide assistance",
    "provide support",
    "offer help",
    "offer assistance",
];

/// Refusals in so many words, by policy or scope rather than by ability.
pub const POLICY_REFUSAL: &[&str] = &[
    "i must decline",
    "i have to decline",
    "i need to decline",
    "i'm going to decline",
    "i decline to",
    "against our policy",
    "against company policy",
    "against policy",
    "our policy does not allow me",
    "our policy doesn't allow me",
    "policy prevents me",
    "not something i can help with",
    "not something i can assist with",
    "not something i can discuss",
    "outside my scope",
    "outside the scope of what i",
    "beyond my scope",
    "i'm afraid i can't",
    "i'm afraid i cannot",
    "i'm not the right person",
];

/// Lower-case words of `text`, each surrounded by single spaces (`" thank you "`): letters, digits
/// and inner apostrophes make words, everything else separates them.
fn words(text: &str) -> String {
    let text = text.to_lowercase().replace(['\u{2019}', '\u{2018}'], "'");
    let mut out = String::from(" ");
    for word in text.split(|c: char| !(c.is_alphanumeric() || c == '\'')) {
        let word = word.trim_matches('\'');
        if !word.is_empty() {
            out.push_str(word);
            out.push(' ');
        }
    }
    out
}

/// Whether the words of `text` (from [`words`]) contain `phrase` as whole words.
fn has_phrase(text_words: &str, phrase: &str) -> bool {
    text_words.contains(&words(phrase))
}

/// Whether `answer` declines to help ([`INABILITY`] + [`REFUSED_ACTIONS`], or [`POLICY_REFUSAL`]).
pub fn is_refusal(answer: &str) -> bool {
    let text = words(answer);
    POLICY_REFUSAL.iter().any(|p| has_phrase(&text, p))
        || INABILITY.iter().any(|n| REFUSED_ACTIONS.iter().any(|a| has_phrase(&text, &format!("{n} {a}"))))
}

/// Whether `answer` has a marker of any [`EMPATHY`] class (refusals included: see [`judge_answer`]).
pub fn shows_empathy(answer: &str) -> bool {
    let text = words(answer);
    EMPATHY.iter().any(|class| class.iter().any(|p| has_phrase(&text, p)))
}

/// The rule-based verdict on one answer.
pub fn judge_answer(answer: &str, rubric: Option<&Rubric>) -> Verdict {
    let text = answer.to_lowercase();
    let states = |fact: &str| text.contains(&fact.to_lowercase());
    let refusal = is_refusal(answer);
    Verdict {
        factual: rubric.map(|r| !refusal && r.facts.iter().all(|f| states(f)) && !r.wrong_facts.iter().any(|f| states(f))),
        empathetic: !refusal && shows_empathy(answer),
        refusal,
    }
}

/// 1 when `trained` scores higher than `base`, 0 when lower, 0.5 for a tie.
pub fn win(trained: &Verdict, base: &Verdict) -> f64 {
    match trained.score().partial_cmp(&base.score()) {
        Some(std::cmp::Ordering::Greater) => 1.0,
        Some(std::cmp::Ordering::Less) => 0.0,
        _ => 0.5,
    }
}

/// The rule-based judge over generations; `rubrics[g.index]` is the rubric of a generation's row
/// (missing or `None`: the answers are judged on tone and refusals only).
pub fn judge_with_rules(generations: &[Generation], rubrics: &[Option<Rubric>]) -> (crate::JudgeReport, Vec<PromptVerdict>) {
    let verdicts: Vec<PromptVerdict> = generations
        .iter()
        .map(|g| {
            let rubric = rubrics.get(g.index).and_then(|r| r.as_ref());
            let trained = judge_answer(&g.policy, rubric);
            let base = judge_answer(&g.reference, rubric);
            PromptVerdict { index: g.index, trained, base, win: win(&trained, &base) }
        })
        .collect();
    (summarise(RULES_JUDGE, &verdicts), verdicts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_are_whole_and_apostrophes_normalised() {
        assert_eq!(words("Thank you! I\u{2019}m 'glad'."), " thank you i'm glad ");
        assert!(has_phrase(&words("Thanks, Anna"), "thanks"));
        assert!(!has_phrase(&words("Happy Thanksgiving"), "thanks"));
        assert!(has_phrase(&words("I can\u{2019}t help with that"), "can't help"));
    }
}
