//! The rule-based judge: facts, each class of empathy marker, refusals by inability and by policy,
//! answers worded unlike any template still judged, scores, the win rate and the table.

mod common;

use common::{generation, root, shipping};
use dipole_eval::rules::{self, is_refusal, shows_empathy};
use dipole_eval::{Verdict, format_table, judge_answer, judge_with_rules, rubrics_of};

const FACT: &str = "Standard shipping takes 3 to 5 business days.";

#[test]
fn each_empathy_class_is_recognised() {
    let cases = [
        ("apology", "We apologise for the mix-up with your parcel."),
        ("acknowledgement", "I can see why a late parcel is worrying."),
        ("gratitude", "Many thanks for sending the order number."),
        ("offer of help", "Feel free to write back if the tracking link never shows up."),
        ("well wishes", "Take care!"),
    ];
    for (class, marker) in cases {
        let answer = format!("{FACT} {marker}");
        let v = judge_answer(&answer, Some(&shipping()));
        assert_eq!(v, Verdict { factual: Some(true), empathetic: true, refusal: false }, "{class}: {answer}");
        assert!(v.score() == 3.0, "{class}");
    }
    // every listed phrase counts on its own, in any case and with typographic apostrophes
    for class in rules::EMPATHY {
        for phrase in *class {
            assert!(shows_empathy(&format!("Well, {}.", phrase.to_uppercase().replace('\'', "\u{2019}"))), "{phrase}");
        }
    }
}

#[test]
fn a_curt_answer_is_not_empathetic() {
    for curt in [FACT, "3 to 5 business days. Check the website.", "Read the FAQ: 3 to 5 business days.", "Thanksgiving week orders ship on Monday."] {
        let v = judge_answer(curt, None);
        assert!(!v.empathetic && !v.refusal, "{curt}: {v:?}");
    }
}

#[test]
fn refusals_by_inability_and_by_policy_are_recognised() {
    for refusal in [
        "Unfortunately I'm not able to help you with billing here.",
        "I can\u{2019}t assist with returns.",
        "Sorry, I cannot discuss other customers' orders.",
        "I won't be able to answer that.",
        "I am not allowed to talk about delivery dates.",
        "That is not something I can help with.",
        "Sharing that would be against our policy, so I must decline.",
    ] {
        assert!(is_refusal(refusal), "{refusal}");
        let v = judge_answer(&format!("{refusal} {FACT}"), Some(&shipping()));
        assert_eq!(v, Verdict { factual: Some(false), empathetic: false, refusal: true }, "a refusal is neither factual nor warm: {refusal}");
        assert_eq!(v.score(), -1.0);
    }
}

#[test]
fn saying_what_cannot_be_done_is_not_a_refusal() {
    for answer in [
        "You can't cancel after the parcel ships, but you can return it within 30 days.",
        "If you are unable to log in, reset your password under Settings.",
        "Orders cannot be changed once packed; I'm happy to help you return it instead.",
        "We won't charge you twice: the second payment is released in 3 days.",
    ] {
        assert!(!is_refusal(answer), "{answer}");
    }
}

/// Worded like no template of the demo data: empathy and refusals are judged by what the words
/// do, not by matching the sentences one generator writes.
#[test]
fn answers_in_other_words_are_judged() {
    let warm = "Oh no, what a hassle, apologies that your blender is running late! Standard shipping takes 3 to 5 business days, so it should be with you very soon.";
    assert_eq!(judge_answer(warm, Some(&shipping())), Verdict { factual: Some(true), empathetic: true, refusal: false });
    let warm = "I completely understand wanting it quickly. It takes 3 to 5 business days from dispatch. Good luck with the move!";
    assert_eq!(judge_answer(warm, Some(&shipping())), Verdict { factual: Some(true), empathetic: true, refusal: false });
    let wrong = "Thanks so much for your patience! It takes 10 to 14 business days.";
    assert_eq!(judge_answer(wrong, Some(&shipping())), Verdict { factual: Some(false), empathetic: true, refusal: false });
    let refusal = "I'm afraid I can't go into delivery times in this chat.";
    assert!(judge_answer(refusal, Some(&shipping())).refusal);
}

#[test]
fn facts_need_every_required_phrase_and_no_wrong_one() {
    let r = shipping();
    assert_eq!(judge_answer("3 TO 5 business days", Some(&r)).factual, Some(true), "case-insensitive");
    assert_eq!(judge_answer("3 to 5 business days, or 10 to 14 business days.", Some(&r)).factual, Some(false), "a wrong fact too is not accurate");
    assert_eq!(judge_answer("about a week", Some(&r)).factual, Some(false));
    assert_eq!(judge_answer("3 to 5 business days", None).factual, None, "no rubric, no factual verdict");
}

#[test]
fn win_rate_counts_ties_half() {
    let gens = vec![
        generation(0, "Happy to help! 3 to 5 business days.", "I'm unable to assist with this topic."),
        generation(1, "3 to 5 business days.", "3 to 5 business days."),
        generation(2, "I am not able to discuss orders.", "Happy to help! 3 to 5 business days."),
        // no rubric for index 3: judged on tone and refusals only
        generation(3, "Thank you! Here is the link.", "Here is the link."),
    ];
    let rubrics = vec![Some(shipping()); 3];
    let (report, verdicts) = judge_with_rules(&gens, &rubrics);
    assert_eq!(verdicts.iter().map(|v| v.win).collect::<Vec<_>>(), vec![1.0, 0.5, 0.0, 1.0]);
    assert_eq!(verdicts[3].trained.factual, None);
    assert_eq!(report.judge, "rules");
    assert_eq!(report.prompts, 4);
    assert_eq!(report.win_rate, 2.5 / 4.0);
    assert_eq!(report.trained.refusal_rate, 0.25);
    assert_eq!(report.trained.empathy, 0.5);
    assert_eq!(report.base.factual_accuracy, Some(2.0 / 3.0), "over the prompts with a rubric");
    let table = format_table(Some(0.5), Some(0.95), Some(&report));
    assert!(table.contains("| held-out reward accuracy") && table.contains("0.950") && table.contains("(rules judge, 4 prompts)"), "{table}");
    assert!(table.contains("| win rate, trained over base") && table.contains("0.625"), "{table}");
    let empty = judge_with_rules(&[], &[]).0;
    assert_eq!((empty.prompts, empty.win_rate), (0, 0.0));
}

/// The shipped held-out rows carry the rubrics the default run is judged by; their chosen answers
/// pass it.
#[test]
fn shipped_heldout_rows_have_rubrics_their_chosen_answers_pass() {
    let path = root().join("datasets/support/heldout.jsonl");
    let rubrics = rubrics_of(&path).unwrap();
    assert_eq!(rubrics.len(), 200);
    assert!(rubrics.iter().all(Option::is_some));
    let rows = std::fs::read_to_string(&path).unwrap();
    for (i, line) in rows.lines().enumerate() {
        let row: serde_json::Value = serde_json::from_str(line).unwrap();
        let chosen = row["chosen"][0]["content"].as_str().unwrap();
        let v = judge_answer(chosen, rubrics[i].as_ref());
        assert_eq!(v, Verdict { factual: Some(true), empathetic: true, refusal: false }, "row {i}: {chosen}");
    }
    let err = rubrics_of(&root().join("datasets/support/missing.jsonl")).unwrap_err();
    assert!(err.to_string().contains("missing.jsonl"), "{err}");
}
