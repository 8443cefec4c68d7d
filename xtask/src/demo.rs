//! `cargo xtask data demo`: the shipped customer-support task. A seeded generator writes an SFT
//! corpus and preference pairs built from templates and a small policy knowledge base, trains a BPE
//! tokenizer on the text, and writes the model folder skeleton (`config.json`, tokenizer files with
//! a chat template) that `cargo xtask sft --config configs/support-base.toml` trains from scratch.
//!
//! Chosen answers are accurate and warm; rejected ones are curt, factually wrong, or needless
//! refusals. Held-out prompts never occur in the SFT corpus or the training pairs, and carry the
//! facts the rule-based judge checks (`facts`, `wrong_facts`).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow};
use clap::Args;
use dipole_models::rng::SeededRng;
use serde_json::{Value, json};

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Output folder (data files, and `init/` with the tokenizer and model config).
    #[arg(long, default_value = "datasets/support")]
    pub out: PathBuf,
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// Prompt-completion rows of the SFT corpus.
    #[arg(long, default_value_t = 4000, value_parser = crate::flags::at_least_one)]
    pub sft: usize,
    /// Training preference pairs.
    #[arg(long, default_value_t = 2400, value_parser = crate::flags::at_least_one)]
    pub pairs: usize,
    /// Held-out preference pairs (prompts never seen in training).
    #[arg(long, default_value_t = 200, value_parser = crate::flags::at_least_one)]
    pub heldout: usize,
    /// BPE vocabulary size (special tokens included).
    #[arg(long, default_value_t = 1024, value_parser = crate::flags::at_least_one)]
    pub vocab_size: usize,
}

/// One customer-support topic: question templates, the correct policy sentence and wrong variants.
struct Topic {
    questions: &'static [&'static str],
    /// The accurate answer sentence; the judge requires every `facts` phrase in it.
    answer: &'static str,
    facts: &'static [&'static str],
    /// Factually wrong versions of `answer`, each with the phrase that gives it away.
    wrong: &'static [(&'static str, &'static str)],
}

const TOPICS: &[Topic] = &[
    Topic {
        questions: &[
            "My order {order} hasn't arrived yet. I chose standard shipping. How long does it take?",
            "How long does standard shipping take for my {product}?",
            "I ordered a {product} with standard delivery. When will it get here?",
        ],
        answer: "Standard shipping takes 3 to 5 business days, and you will get a tracking link by email.",
        facts: &["3 to 5 business days"],
        wrong: &[
            ("Standard shipping takes 10 to 14 business days, and you will get a tracking link by email.", "10 to 14 business days"),
            ("Standard shipping takes 1 to 2 business days, and you will get a tracking link by email.", "1 to 2 business days"),
        ],
    },
    Topic {
        questions: &[
            "I paid for express shipping on order {order}. When will my {product} arrive?",
            "How fast is express delivery?",
            "I picked express shipping for my {product}. How long will it take?",
        ],
        answer: "Express shipping takes 1 to 2 business days once the order leaves our warehouse.",
        facts: &["1 to 2 business days"],
        wrong: &[
            ("Express shipping takes 3 to 5 business days once the order leaves our warehouse.", "3 to 5 business days"),
            ("Express shipping takes 7 to 10 business days once the order leaves our warehouse.", "7 to 10 business days"),
        ],
    },
    Topic {
        questions: &[
            "I sent back my {product} last week. When will I get my refund?",
            "How long do refunds take? My order number is {order}.",
            "I returned order {order}. When does the money come back?",
        ],
        answer: "Refunds go back to your original payment method within 5 to 7 business days after the return arrives.",
        facts: &["5 to 7 business days"],
        wrong: &[
            ("Refunds go back to your original payment method within 30 business days after the return arrives.", "30 business days"),
            ("Refunds are paid as store credit only, within 5 to 7 business days after the return arrives.", "store credit only"),
        ],
    },
    Topic {
        questions: &[
            "Can I still return the {product} I bought?",
            "What is your return policy for a {product}?",
            "How many days do I have to return order {order}?",
        ],
        answer: "You can return any item within 30 days of delivery for a full refund.",
        facts: &["30 days"],
        wrong: &[
            ("You can return any item within 7 days of delivery for a full refund.", "7 days"),
            ("Returns are not accepted once an item has been delivered.", "not accepted"),
        ],
    },
    Topic {
        questions: &[
            "I forgot my password and can't log in.",
            "How do I reset my password?",
            "My account is locked and I need a new password.",
        ],
        answer: "Click Forgot password on the sign-in page and we will email you a reset link that is valid for 24 hours.",
        facts: &["Forgot password", "24 hours"],
        wrong: &[
            ("Click Forgot password on the sign-in page and we will email you a reset link that is valid for 5 minutes.", "5 minutes"),
            ("Passwords can only be reset by mailing us a copy of your ID.", "copy of your ID"),
        ],
    },
    Topic {
        questions: &[
            "Can I cancel order {order}? I placed it this morning.",
            "I ordered a {product} by mistake. Can I cancel it?",
            "How do I cancel my order {order}?",
        ],
        answer: "You can cancel an order within 2 hours of placing it from the Orders page.",
        facts: &["within 2 hours"],
        wrong: &[
            ("You can cancel an order within 30 days of placing it from the Orders page.", "within 30 days"),
            ("Orders cannot be cancelled once they are placed.", "cannot be cancelled"),
        ],
    },
    Topic {
        questions: &[
            "My {product} arrived damaged. What can I do?",
            "The box for order {order} was crushed and my {product} is broken.",
            "I received a broken {product}.",
        ],
        answer: "Send us a photo within 14 days and we will ship a free replacement right away.",
        facts: &["free replacement", "14 days"],
        wrong: &[
            ("Send us a photo within 14 days and we will repair it for a small fee.", "small fee"),
            ("Damaged items are the carrier's responsibility, so please contact them.", "contact them"),
        ],
    },
    Topic {
        questions: &[
            "I need to change the delivery address for order {order}.",
            "I moved. Can I update the shipping address on my {product} order?",
            "How do I change where my order {order} is delivered?",
        ],
        answer: "You can change the address under Account and Addresses until the order ships.",
        facts: &["until the order ships"],
        wrong: &[
            ("Addresses cannot be changed after checkout, so the order will go to the old address.", "cannot be changed"),
            ("You can change the address at any time, even after the parcel is delivered.", "even after the parcel is delivered"),
        ],
    },
    Topic {
        questions: &[
            "Which payment methods do you accept?",
            "Can I pay for a {product} with PayPal?",
            "What cards can I use to pay?",
        ],
        answer: "We accept Visa, Mastercard, PayPal and gift cards.",
        facts: &["PayPal", "Visa"],
        wrong: &[
            ("We only accept cash on delivery.", "cash on delivery"),
            ("We accept bank transfers only.", "bank transfers only"),
        ],
    },
    Topic {
        questions: &[
            "Is my {product} covered by a warranty?",
            "My {product} stopped working after a few months. Is it under warranty?",
            "How long is the warranty on a {product}?",
        ],
        answer: "Every product comes with a 2-year warranty that covers repairs and replacements.",
        facts: &["2-year warranty"],
        wrong: &[
            ("Every product comes with a 30-day warranty that covers repairs and replacements.", "30-day warranty"),
            ("Our products are sold without any warranty.", "without any warranty"),
        ],
    },
    Topic {
        questions: &[
            "When can I reach your support team?",
            "What are your customer service hours?",
            "Is support open on weekends?",
        ],
        answer: "Our support team is available from 8am to 8pm, Monday to Saturday.",
        facts: &["8am to 8pm"],
        wrong: &[
            ("Our support team is available from 9am to 11am, Monday only.", "9am to 11am"),
            ("Our support team is available only by post.", "only by post"),
        ],
    },
    Topic {
        questions: &[
            "How do I cancel my {plan} subscription?",
            "I want to stop my {plan} plan.",
            "Can I end my {plan} membership online?",
        ],
        answer: "Go to Settings and then Subscription to cancel, and you keep access until the end of the billing period.",
        facts: &["Settings", "end of the billing period"],
        wrong: &[
            ("Subscriptions renew for a full year and cannot be stopped early.", "cannot be stopped"),
            ("Go to Settings and then Subscription to cancel, and your access ends immediately with no refund.", "ends immediately"),
        ],
    },
];

const PRODUCTS: &[&str] = &[
    "blender", "laptop", "phone case", "desk lamp", "coffee maker", "backpack", "headphones", "keyboard", "water bottle",
    "rain jacket", "toaster", "monitor", "yoga mat", "kettle", "smart watch", "camera", "office chair", "bike helmet",
    "phone charger", "sofa cushion", "table fan", "gaming mouse", "winter boots", "air fryer", "tablet", "speaker",
    "frying pan", "printer", "vacuum cleaner", "sunglasses",
];
const PLANS: &[&str] = &["Basic", "Plus", "Premium", "Family", "Student", "Pro"];
const NAMES: &[&str] = &[
    "Anna", "Ben", "Chloe", "David", "Elena", "Farid", "Grace", "Hugo", "Ines", "Jack", "Keiko", "Liam", "Maya", "Noah",
    "Olga", "Pedro", "Quinn", "Rosa", "Sam", "Tara",
];
const OPENERS: &[&str] = &["", "", "Hi. ", "Hello, ", "Hi, this is {name}. ", "Hey there. ", "Good morning. "];
const MOODS: &[&str] = &["", "", "", " I'm really frustrated.", " Please help.", " Thanks in advance.", " This is urgent."];
const WARM_OPENERS: &[&str] = &[
    "I'm sorry for the trouble, and thanks for reaching out!",
    "Thanks for reaching out, I'm happy to help!",
    "I understand how frustrating this is, and I'm glad to help.",
    "Happy to help with that!",
    "Thank you for your patience, I understand.",
];
const WARM_CLOSERS: &[&str] = &[
    "Is there anything else I can help you with?",
    "Let me know if there is anything else I can do for you.",
    "I hope this helps, and have a wonderful day!",
];
const CURT: &[&str] = &["{answer}", "{answer} Check the website next time.", "Read the FAQ. {answer}"];
const REFUSALS: &[&str] = &[
    "I'm sorry, but I can't help with that request.",
    "I am not able to discuss account or order questions.",
    "Sorry, I am unable to assist with this topic.",
];

/// The answer styles: the chosen one and the three ways an answer goes wrong.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Style {
    Good,
    Curt,
    Wrong,
    Refusal,
}

struct Gen {
    rng: SeededRng,
}

impl Gen {
    fn below(&mut self, n: usize) -> usize {
        (self.rng.next_u64() % n as u64) as usize
    }

    fn pick<'a>(&mut self, items: &'a [&'a str]) -> &'a str {
        items[self.below(items.len())]
    }

    fn prompt(&mut self, topic: &Topic) -> String {
        let question = self.pick(topic.questions).to_string();
        let text = format!("{}{}{}", self.pick(OPENERS), question, self.pick(MOODS));
        let order = format!("#{}", 10000 + self.below(90000));
        text.replace("{name}", self.pick(NAMES))
            .replace("{order}", &order)
            .replace("{product}", self.pick(PRODUCTS))
            .replace("{plan}", self.pick(PLANS))
    }

    fn answer(&mut self, topic: &Topic, style: Style) -> String {
        match style {
            Style::Good => format!("{} {} {}", self.pick(WARM_OPENERS), topic.answer, self.pick(WARM_CLOSERS)),
            Style::Curt => self.pick(CURT).replace("{answer}", topic.answer),
            Style::Wrong => {
                let (wrong, _) = topic.wrong[self.below(topic.wrong.len())];
                format!("{} {} {}", self.pick(WARM_OPENERS), wrong, self.pick(WARM_CLOSERS))
            }
            Style::Refusal => self.pick(REFUSALS).to_string(),
        }
    }

    /// A style by weights (in percent).
    fn style(&mut self, weights: [usize; 4]) -> Style {
        let mut x = self.below(weights.iter().sum());
        for (style, w) in [Style::Good, Style::Curt, Style::Wrong, Style::Refusal].into_iter().zip(weights) {
            if x < w {
                return style;
            }
            x -= w;
        }
        unreachable!()
    }
}

fn user(text: &str) -> Value {
    json!([{"role": "user", "content": text}])
}

fn assistant(text: &str) -> Value {
    json!([{"role": "assistant", "content": text}])
}

fn write_jsonl(path: &Path, rows: &[Value]) -> Result<()> {
    let mut text = String::new();
    for r in rows {
        text.push_str(&serde_json::to_string(r)?);
        text.push('\n');
    }
    std::fs::write(path, text).with_context(|| path.display().to_string())
}

/// Style mix of the SFT corpus (good, curt, wrong, refusal): the base model learns to write all
/// four, as a model pretrained on mixed-quality support logs would.
const SFT_MIX: [usize; 4] = [25, 25, 25, 25];
/// Mix of the rejected answers of the preference pairs (curt, wrong, refusal).
const REJECTED_MIX: [usize; 4] = [0, 40, 35, 25];

pub const CHAT_TEMPLATE: &str = "<|bos|>{% for message in messages %}{% if message['role'] == 'user' %}<|user|>{{ message['content'] }}<|end|>{% elif message['role'] == 'assistant' %}<|assistant|>{{ message['content'] }}<|end|>{% else %}{{ raise_exception('the support template has no ' ~ message['role'] ~ ' messages: use user and assistant') }}{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}";
const SPECIAL: &[&str] = &["<|pad|>", "<|bos|>", "<|end|>", "<|user|>", "<|assistant|>"];

pub fn run(args: DemoArgs) -> Result<()> {
    let mut g = Gen { rng: SeededRng::new(args.seed) };
    std::fs::create_dir_all(&args.out).with_context(|| args.out.display().to_string())?;

    // Held-out prompts first; training prompts must differ from every one of them.
    let mut heldout_prompts = BTreeSet::new();
    let mut heldout = Vec::new();
    while heldout.len() < args.heldout {
        let t = g.below(TOPICS.len());
        let topic = &TOPICS[t];
        let prompt = g.prompt(topic);
        if !heldout_prompts.insert(prompt.clone()) {
            continue;
        }
        let rejected_style = g.style(REJECTED_MIX);
        let chosen = g.answer(topic, Style::Good);
        let rejected = g.answer(topic, rejected_style);
        heldout.push(json!({
            "prompt": user(&prompt),
            "chosen": assistant(&chosen),
            "rejected": assistant(&rejected),
            "facts": topic.facts,
            "wrong_facts": topic.wrong.iter().map(|(_, phrase)| *phrase).collect::<Vec<_>>(),
        }));
    }
    let fresh_prompt = |g: &mut Gen| loop {
        let t = g.below(TOPICS.len());
        let prompt = g.prompt(&TOPICS[t]);
        if !heldout_prompts.contains(&prompt) {
            return (t, prompt);
        }
    };
    let mut sft = Vec::with_capacity(args.sft);
    for _ in 0..args.sft {
        let (t, prompt) = fresh_prompt(&mut g);
        let style = g.style(SFT_MIX);
        sft.push(json!({"prompt": user(&prompt), "completion": assistant(&g.answer(&TOPICS[t], style))}));
    }
    let mut pairs = Vec::with_capacity(args.pairs);
    for _ in 0..args.pairs {
        let (t, prompt) = fresh_prompt(&mut g);
        let rejected_style = g.style(REJECTED_MIX);
        let chosen = g.answer(&TOPICS[t], Style::Good);
        let rejected = g.answer(&TOPICS[t], rejected_style);
        pairs.push(json!({"prompt": user(&prompt), "chosen": assistant(&chosen), "rejected": assistant(&rejected)}));
    }
    write_jsonl(&args.out.join("sft.jsonl"), &sft)?;
    write_jsonl(&args.out.join("train.jsonl"), &pairs)?;
    write_jsonl(&args.out.join("heldout.jsonl"), &heldout)?;

    // Tokenizer and model skeleton.
    let init = args.out.join("init");
    std::fs::create_dir_all(&init)?;
    let mut corpus: Vec<String> = Vec::new();
    for row in sft.iter().chain(&pairs) {
        for key in ["prompt", "completion", "chosen", "rejected"] {
            if let Some(text) = row.get(key).and_then(|m| m[0]["content"].as_str()) {
                corpus.push(text.to_string());
            }
        }
    }
    train_tokenizer(&corpus, args.vocab_size, &init.join("tokenizer.json"))?;
    write_model_files(&init, args.vocab_size)?;
    println!(
        "wrote {} SFT rows, {} training pairs, {} held-out pairs and the tokenizer + model config in {}",
        sft.len(),
        pairs.len(),
        heldout.len(),
        args.out.display()
    );
    Ok(())
}

fn train_tokenizer(corpus: &[String], vocab_size: usize, path: &Path) -> Result<()> {
    use tokenizers::models::TrainerWrapper;
    use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::{AddedToken, Tokenizer};

    let specials: Vec<AddedToken> = SPECIAL.iter().map(|s| AddedToken::from(s.to_string(), true)).collect();
    let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(specials.clone())
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build()
        .into();
    let mut tokenizer = Tokenizer::new(BPE::default());
    tokenizer.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tokenizer.with_decoder(Some(ByteLevel::default()));
    tokenizer.train(&mut trainer, corpus.iter()).map_err(|e| anyhow!("training the tokenizer: {e}"))?;
    tokenizer.add_special_tokens(&specials);
    tokenizer.save(path, true).map_err(|e| anyhow!("{}: {e}", path.display()))?;
    Ok(())
}

fn write_model_files(dir: &Path, vocab_size: usize) -> Result<()> {
    // ids of the special tokens are their positions: the trainer puts them first
    let config = json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": 128,
        "intermediate_size": 384,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "hidden_act": "silu",
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": true,
        "initializer_range": 0.02,
        "attention_bias": false,
        "mlp_bias": false,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float32",
    });
    let tokenizer_config = json!({
        "bos_token": "<|bos|>",
        "eos_token": "<|end|>",
        "pad_token": "<|pad|>",
        "chat_template": CHAT_TEMPLATE,
        "model_max_length": 256,
        "tokenizer_class": "PreTrainedTokenizerFast",
    });
    let generation = json!({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0});
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&config)?)?;
    std::fs::write(dir.join("tokenizer_config.json"), serde_json::to_string_pretty(&tokenizer_config)?)?;
    std::fs::write(dir.join("generation_config.json"), serde_json::to_string_pretty(&generation)?)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn correct_answers_state_their_facts_and_wrong_ones_their_giveaway() {
        for topic in TOPICS {
            for fact in topic.facts {
                assert!(topic.answer.contains(fact), "{:?} lacks {fact:?}", topic.answer);
            }
            for (wrong, phrase) in topic.wrong {
                assert!(wrong.contains(phrase), "{wrong:?} lacks {phrase:?}");
                assert!(!topic.answer.contains(phrase), "{:?} contains the wrong phrase {phrase:?}", topic.answer);
            }
        }
    }

    #[test]
    fn generator_is_deterministic_and_keeps_heldout_prompts_out_of_training() {
        let dir = tempfile::tempdir().unwrap();
        let write = |sub: &str| {
            let out = dir.path().join(sub);
            run(DemoArgs { out: out.clone(), seed: 3, sft: 300, pairs: 200, heldout: 40, vocab_size: 400 }).unwrap();
            out
        };
        let (a, b) = (write("a"), write("b"));
        for file in ["sft.jsonl", "train.jsonl", "heldout.jsonl", "init/tokenizer.json"] {
            assert_eq!(std::fs::read(a.join(file)).unwrap(), std::fs::read(b.join(file)).unwrap(), "{file}");
        }
        let prompts = |file: &str| -> BTreeSet<String> {
            std::fs::read_to_string(a.join(file))
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str::<Value>(l).unwrap()["prompt"][0]["content"].as_str().unwrap().to_string())
                .collect()
        };
        let heldout = prompts("heldout.jsonl");
        assert_eq!(heldout.len(), 40);
        assert!(heldout.is_disjoint(&prompts("train.jsonl")));
        assert!(heldout.is_disjoint(&prompts("sft.jsonl")));
        // the tokenizer reads back with its specials and chat template
        let tok = dipole_data::Tokenizer::from_dir(a.join("init")).unwrap();
        assert_eq!(tok.eos.as_ref().unwrap().id, 2);
        assert_eq!(tok.pad_id(), 0);
    }
}
