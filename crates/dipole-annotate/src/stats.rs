//! The numbers of an annotation round: per-annotator counts and progress, Cohen's kappa of every
//! pair of annotators (over the items both judged), Fleiss' kappa and Krippendorff's alpha over all
//! items with two or more judgments. Categories are the item's first response, its second, and tie
//! (the side an annotator saw is not a category: sides are shuffled per annotator).

use std::collections::BTreeMap;

use serde::Serialize;

use crate::agreement::{cohen_kappa, fleiss_kappa, krippendorff_alpha_nominal};
use crate::error::Result;
use crate::store::{Annotator, Store, Vote, VoteRow};

impl Store {
    /// The round's statistics, items being done at `per_item` judgments.
    pub fn stats(&self, per_item: usize) -> Result<Stats> {
        Ok(compute(self.item_count()?, per_item, &self.annotators()?, &self.votes()?))
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Stats {
    pub items: usize,
    /// Items with at least `per_item` judgments.
    pub done: usize,
    pub per_item: usize,
    pub judgments: usize,
    pub annotators: Vec<AnnotatorStats>,
    /// One entry per pair of annotators, in the order they were added.
    pub pairs: Vec<PairAgreement>,
    pub fleiss_kappa: Option<f64>,
    pub krippendorff_alpha: Option<f64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AnnotatorStats {
    pub name: String,
    pub judged: usize,
    /// Items still open to them (not judged by them, not done).
    pub left: usize,
    pub first: usize,
    pub second: usize,
    pub tie: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PairAgreement {
    pub a: String,
    pub b: String,
    /// Items both judged.
    pub items: usize,
    /// Share of those items where they made the same choice.
    pub agreement: Option<f64>,
    pub kappa: Option<f64>,
}

/// The statistics of `votes` (`(item, annotator id, vote)`) over `items` items numbered 1..=items.
pub fn compute(items: usize, per_item: usize, annotators: &[Annotator], votes: &[VoteRow]) -> Stats {
    let mut by_item: BTreeMap<i64, BTreeMap<i64, Vote>> = BTreeMap::new();
    for &(item, who, vote) in votes {
        by_item.entry(item).or_default().insert(who, vote);
    }
    let done: Vec<i64> = by_item.iter().filter(|(_, v)| v.len() >= per_item).map(|(&i, _)| i).collect();
    let per_annotator = annotators
        .iter()
        .map(|a| {
            let mine: Vec<Vote> = by_item.values().filter_map(|v| v.get(&a.id).copied()).collect();
            let done_elsewhere = done.iter().filter(|i| !by_item[i].contains_key(&a.id)).count();
            let count = |want: Vote| mine.iter().filter(|&&v| v == want).count();
            AnnotatorStats {
                name: a.name.clone(),
                judged: mine.len(),
                left: items.saturating_sub(mine.len() + done_elsewhere),
                first: count(Vote::First),
                second: count(Vote::Second),
                tie: count(Vote::Tie),
            }
        })
        .collect();
    let mut pairs = Vec::new();
    for (i, a) in annotators.iter().enumerate() {
        for b in &annotators[i + 1..] {
            let both: Vec<(Vote, Vote)> = by_item.values().filter_map(|v| Some((*v.get(&a.id)?, *v.get(&b.id)?))).collect();
            let same = both.iter().filter(|(x, y)| x == y).count();
            let agreement = (!both.is_empty()).then(|| same as f64 / both.len() as f64);
            pairs.push(PairAgreement { a: a.name.clone(), b: b.name.clone(), items: both.len(), agreement, kappa: cohen_kappa(&both) });
        }
    }
    let table: Vec<[usize; 3]> = by_item
        .values()
        .map(|v| {
            let count = |want: Vote| v.values().filter(|&&x| x == want).count();
            [count(Vote::First), count(Vote::Second), count(Vote::Tie)]
        })
        .collect();
    let units: Vec<Vec<Vote>> = by_item.values().map(|v| v.values().copied().collect()).collect();
    Stats {
        items,
        done: done.len(),
        per_item,
        judgments: votes.len(),
        annotators: per_annotator,
        pairs,
        fleiss_kappa: fleiss_kappa(&table),
        krippendorff_alpha: krippendorff_alpha_nominal(&units),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Vote::{First as F, Second as S, Tie as T};

    fn who(id: i64, name: &str) -> Annotator {
        Annotator { id, name: name.into(), token: String::new() }
    }

    /// Three annotators, four items, per_item 3:
    ///
    /// ```text
    /// item   ann  bob  cat
    ///  1      F    F    F
    ///  2      F    S    F
    ///  3      S    S    -
    ///  4      T    -    -
    /// ```
    /// ann-bob over items 1-3: table (F,F) (F,S) (S,S): p_o = 2/3; ann (F 2, S 1), bob (F 1, S 2):
    /// p_e = (2·1 + 1·2) / 9 = 4/9; κ = (6/9 - 4/9) / (5/9) = 2/5.
    /// ann-cat over 1-2: (F,F) (F,F): p_e = 1, undefined. bob-cat over 1-2: (F,F) (S,F): p_o = 1/2,
    /// p_e = (1·2 + 1·0) / 4 = 1/2, κ = 0.
    #[test]
    fn counts_progress_and_pairwise_kappa() {
        let people = [who(1, "ann"), who(2, "bob"), who(3, "cat")];
        let votes = vec![(1, 1, F), (1, 2, F), (1, 3, F), (2, 1, F), (2, 2, S), (2, 3, F), (3, 1, S), (3, 2, S), (4, 1, T)];
        let s = compute(5, 3, &people, &votes);
        assert_eq!((s.items, s.done, s.judgments), (5, 2, 9));
        let ann = &s.annotators[0];
        assert_eq!((ann.judged, ann.left, ann.first, ann.second, ann.tie), (4, 1, 2, 1, 1));
        // cat: judged 1 and 2 (both done); open: 3, 4, 5
        assert_eq!((s.annotators[2].judged, s.annotators[2].left), (2, 3));
        let kappas: Vec<(usize, Option<f64>)> = s.pairs.iter().map(|p| (p.items, p.kappa)).collect();
        assert_eq!(kappas.len(), 3);
        assert_eq!(kappas[0].0, 3);
        assert!((kappas[0].1.unwrap() - 0.4).abs() < 1e-12, "{kappas:?}");
        assert_eq!(kappas[1], (2, None));
        assert_eq!(kappas[2].0, 2);
        assert!(kappas[2].1.unwrap().abs() < 1e-12);
        assert!((s.pairs[0].agreement.unwrap() - 2.0 / 3.0).abs() < 1e-12);
        // Fleiss and alpha over items 1-3 (item 4 has one vote): both defined
        assert!(s.fleiss_kappa.is_some() && s.krippendorff_alpha.is_some());
    }

    #[test]
    fn no_votes_no_statistics() {
        let s = compute(3, 2, &[who(1, "ann"), who(2, "bob")], &[]);
        assert_eq!(s.fleiss_kappa, None);
        assert_eq!(s.krippendorff_alpha, None);
        assert_eq!(s.pairs[0].kappa, None);
        assert_eq!(s.pairs[0].agreement, None);
        assert_eq!(s.annotators[1].left, 3);
    }
}
