//! Inter-annotator agreement, as pure functions over labels: Cohen's kappa (two raters), Fleiss'
//! kappa (many raters, counts per category) and Krippendorff's alpha for nominal data (any number
//! of raters, missing values allowed).
//!
//! Each returns `None` where the statistic is undefined: no data, or agreement by chance is already
//! perfect (every label the same), where the formulas divide by zero.

use std::collections::BTreeMap;

/// Cohen's kappa of two raters over the items both labelled, one `(rater 1, rater 2)` pair per item:
/// `(p_o - p_e) / (1 - p_e)`, `p_o` the share of items where they agree and `p_e = Σ_k p1(k) p2(k)`
/// the agreement expected from each rater's own label frequencies.
pub fn cohen_kappa<T: Ord>(pairs: &[(T, T)]) -> Option<f64> {
    if pairs.is_empty() {
        return None;
    }
    let n = pairs.len() as f64;
    let mut first: BTreeMap<&T, f64> = BTreeMap::new();
    let mut second: BTreeMap<&T, f64> = BTreeMap::new();
    let mut agree = 0.0;
    for (a, b) in pairs {
        *first.entry(a).or_default() += 1.0;
        *second.entry(b).or_default() += 1.0;
        if a == b {
            agree += 1.0;
        }
    }
    let observed = agree / n;
    let expected: f64 = first.iter().map(|(k, c)| c / n * second.get(k).copied().unwrap_or(0.0) / n).sum();
    ratio(observed - expected, 1.0 - expected)
}

/// Fleiss' kappa from a table of items × categories, each cell the number of raters who put that
/// item in that category.
///
/// With the same number of ratings `n` on every item this is Fleiss (1971): `P_i = (Σ_j n_ij² - n) /
/// (n (n - 1))`, `P̄` their mean, `p_j` the share of all ratings in category `j`, `P_e = Σ_j p_j²`,
/// `κ = (P̄ - P_e) / (1 - P_e)`. Items may also have different numbers of ratings (an annotation
/// round in progress): each `P_i` then uses its own `n_i`, `p_j` pools all ratings, and items with
/// fewer than two ratings are left out (they have no pair to agree on).
pub fn fleiss_kappa<const K: usize>(table: &[[usize; K]]) -> Option<f64> {
    let rows: Vec<&[usize; K]> = table.iter().filter(|row| row.iter().sum::<usize>() >= 2).collect();
    if rows.is_empty() {
        return None;
    }
    let mut per_category = [0.0f64; K];
    let mut total = 0.0;
    let mut mean_p = 0.0;
    for row in &rows {
        let n: f64 = row.iter().sum::<usize>() as f64;
        let same: f64 = row.iter().map(|&c| (c * c) as f64).sum::<f64>() - n;
        mean_p += same / (n * (n - 1.0));
        for (j, &c) in row.iter().enumerate() {
            per_category[j] += c as f64;
        }
        total += n;
    }
    mean_p /= rows.len() as f64;
    let expected: f64 = per_category.iter().map(|c| (c / total).powi(2)).sum();
    ratio(mean_p - expected, 1.0 - expected)
}

/// Krippendorff's alpha for nominal data: one entry per unit (item) holding the values its raters
/// gave (a missing rating is simply absent).
///
/// Built on the coincidence matrix: a unit with `m_u >= 2` values adds `1 / (m_u - 1)` to `o_ck` for
/// every ordered pair of its values from different raters; units with a single value are not
/// pairable and are left out. With `n_c = Σ_k o_ck` and `n = Σ_c n_c`,
/// `α = 1 - (n - 1) Σ_{c≠k} o_ck / Σ_{c≠k} n_c n_k` (Krippendorff 2011, "Computing Krippendorff's
/// Alpha-Reliability").
pub fn krippendorff_alpha_nominal<T: Ord>(units: &[Vec<T>]) -> Option<f64> {
    let mut coincidences: BTreeMap<(&T, &T), f64> = BTreeMap::new();
    for values in units.iter().filter(|v| v.len() >= 2) {
        let weight = 1.0 / (values.len() - 1) as f64;
        for (i, a) in values.iter().enumerate() {
            for (j, b) in values.iter().enumerate() {
                if i != j {
                    *coincidences.entry((a, b)).or_default() += weight;
                }
            }
        }
    }
    let mut marginals: BTreeMap<&T, f64> = BTreeMap::new();
    for ((c, _), o) in &coincidences {
        *marginals.entry(c).or_default() += o;
    }
    let n: f64 = marginals.values().sum();
    if n < 2.0 {
        return None;
    }
    let disagree: f64 = coincidences.iter().filter(|((c, k), _)| c != k).map(|(_, o)| o).sum();
    let total: f64 = marginals.values().sum::<f64>().powi(2) - marginals.values().map(|m| m * m).sum::<f64>();
    // 1 - D_o / D_e, D_o = disagree / n, D_e = total / (n (n - 1))
    ratio(total - (n - 1.0) * disagree, total)
}

/// `num / den`, or `None` when `den` is (numerically) zero.
fn ratio(num: f64, den: f64) -> Option<f64> {
    (den.abs() > 1e-12).then(|| num / den)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(got: Option<f64>, want: f64, tol: f64) {
        let got = got.expect("statistic is defined");
        assert!((got - want).abs() < tol, "got {got}, want {want}");
    }

    /// Two raters, 10 items, labels A/B/T:
    ///
    /// ```text
    ///            rater 2
    ///            A  B  T  | row
    /// rater 1 A  4  1  0  |  5
    ///         B  0  3  1  |  4
    ///         T  0  0  1  |  1
    ///       col  4  4  2  | 10
    /// ```
    /// p_o = (4 + 3 + 1) / 10 = 0.8; p_e = (5·4 + 4·4 + 1·2) / 100 = 0.38;
    /// κ = (0.8 - 0.38) / (1 - 0.38) = 0.42 / 0.62 = 21/31 = 0.677419...
    #[test]
    fn cohen_kappa_matches_a_hand_computed_table() {
        let mut pairs = Vec::new();
        pairs.extend(std::iter::repeat_n(('A', 'A'), 4));
        pairs.push(('A', 'B'));
        pairs.extend(std::iter::repeat_n(('B', 'B'), 3));
        pairs.push(('B', 'T'));
        pairs.push(('T', 'T'));
        close(cohen_kappa(&pairs), 21.0 / 31.0, 1e-12);
        // order of items does not matter, and swapping the raters gives the same kappa
        let swapped: Vec<(char, char)> = pairs.iter().rev().map(|&(a, b)| (b, a)).collect();
        close(cohen_kappa(&swapped), 21.0 / 31.0, 1e-12);
    }

    /// Perfect agreement is 1; agreeing exactly as often as chance predicts is 0; undefined cases.
    #[test]
    fn cohen_kappa_bounds_and_undefined_cases() {
        close(cohen_kappa(&[(1, 1), (2, 2), (1, 1)]), 1.0, 1e-12);
        // p_o = 0.5, p_e = (2·2 + 2·2) / 16 = 0.5
        close(cohen_kappa(&[(1, 1), (1, 2), (2, 1), (2, 2)]), 0.0, 1e-12);
        // always disagreeing on two labels: p_o = 0, p_e = 0.5 -> -1
        close(cohen_kappa(&[(1, 2), (2, 1)]), -1.0, 1e-12);
        assert_eq!(cohen_kappa::<u8>(&[]), None);
        // both raters always say the same label: p_e = 1
        assert_eq!(cohen_kappa(&[(1, 1), (1, 1)]), None);
    }

    /// 4 items, 3 raters each, categories (A, B, T):
    ///
    /// ```text
    /// item  A B T   P_i = (Σ n_ij² - 3) / 6
    ///  1    3 0 0   (9 - 3) / 6     = 1
    ///  2    2 1 0   (4 + 1 - 3) / 6 = 1/3
    ///  3    0 3 0   1
    ///  4    1 1 1   (1 + 1 + 1 - 3) / 6 = 0
    /// ```
    /// P̄ = (1 + 1/3 + 1 + 0) / 4 = 7/12; p = (6, 5, 1) / 12; P_e = (36 + 25 + 1) / 144 = 62/144;
    /// κ = (84/144 - 62/144) / (82/144) = 22/82 = 11/41 = 0.268292...
    #[test]
    fn fleiss_kappa_matches_a_hand_computed_table() {
        let table = [[3, 0, 0], [2, 1, 0], [0, 3, 0], [1, 1, 1]];
        close(fleiss_kappa(&table), 11.0 / 41.0, 1e-12);
    }

    /// The worked example of Fleiss' kappa on Wikipedia ("Fleiss' kappa", 10 items, 14 raters,
    /// 5 categories), whose published value is 0.210.
    #[test]
    fn fleiss_kappa_matches_the_wikipedia_example() {
        let table = [
            [0, 0, 0, 0, 14],
            [0, 2, 6, 4, 2],
            [0, 0, 3, 5, 6],
            [0, 3, 9, 2, 0],
            [2, 2, 8, 1, 1],
            [7, 7, 0, 0, 0],
            [3, 2, 6, 3, 0],
            [2, 5, 3, 2, 2],
            [6, 5, 2, 1, 0],
            [0, 2, 2, 3, 7],
        ];
        close(fleiss_kappa(&table), 0.210, 5e-4);
    }

    /// Items with a single rating drop out; a table of one label everywhere is undefined.
    #[test]
    fn fleiss_kappa_skips_single_ratings() {
        let table = [[3, 0, 0], [2, 1, 0], [0, 3, 0], [1, 1, 1], [1, 0, 0], [0, 0, 1]];
        close(fleiss_kappa(&table), 11.0 / 41.0, 1e-12);
        assert_eq!(fleiss_kappa(&[[3, 0], [2, 0]]), None);
        assert_eq!(fleiss_kappa::<2>(&[]), None);
    }

    /// Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability", section C: four
    /// observers, twelve units, values 1-5 with missing data; the published nominal alpha is 0.743.
    ///
    /// ```text
    /// unit       1  2  3  4  5  6  7  8  9 10 11 12
    /// observer A 1  2  3  3  2  1  4  1  2  .  .  .
    /// observer B 1  2  3  3  2  2  4  1  2  5  .  3
    /// observer C .  3  3  3  2  3  4  2  2  5  1  .
    /// observer D 1  2  3  3  2  4  4  1  2  5  1  .
    /// ```
    /// Unit 12 has one value and is not pairable: n = 40 pairable values, n_c = (9, 13, 10, 5, 3),
    /// Σ_{c≠k} o_ck = 8 and Σ_{c≠k} n_c n_k = 40² - (81 + 169 + 100 + 25 + 9) = 1216, so
    /// α = 1 - 39 · 8 / 1216 = 0.743421...
    #[test]
    fn krippendorff_alpha_matches_the_published_example() {
        let units: Vec<Vec<u8>> = vec![
            vec![1, 1, 1],
            vec![2, 2, 3, 2],
            vec![3, 3, 3, 3],
            vec![3, 3, 3, 3],
            vec![2, 2, 2, 2],
            vec![1, 2, 3, 4],
            vec![4, 4, 4, 4],
            vec![1, 1, 2, 1],
            vec![2, 2, 2, 2],
            vec![5, 5, 5],
            vec![1, 1],
            vec![3],
        ];
        let alpha = krippendorff_alpha_nominal(&units).unwrap();
        assert_eq!(format!("{alpha:.3}"), "0.743", "alpha = {alpha}");
        close(Some(alpha), 1.0 - 39.0 * 8.0 / 1216.0, 1e-12);
    }

    /// Two raters, no missing values, labels A/B:
    ///
    /// ```text
    /// unit   1 2 3 4
    /// r1     A A B B
    /// r2     A B B B
    /// ```
    /// Coincidences (each unit weight 1/(2-1) = 1): o_AA = 2, o_BB = 4, o_AB = o_BA = 1;
    /// n_A = 3, n_B = 5, n = 8; α = 1 - (n - 1) (o_AB + o_BA) / (2 n_A n_B) = 1 - 7·2/30 = 8/15.
    #[test]
    fn krippendorff_alpha_matches_a_hand_computed_example() {
        let units = vec![vec!['A', 'A'], vec!['A', 'B'], vec!['B', 'B'], vec!['B', 'B']];
        close(krippendorff_alpha_nominal(&units), 8.0 / 15.0, 1e-12);
        assert_eq!(krippendorff_alpha_nominal::<u8>(&[vec![1], vec![2]]), None);
        assert_eq!(krippendorff_alpha_nominal(&[vec![1, 1], vec![1, 1]]), None);
    }
}
