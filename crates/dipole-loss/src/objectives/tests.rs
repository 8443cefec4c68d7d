//! Every objective against its formula, evaluated by hand in f64 on small batches.

use burn::backend::Flex;
use burn::tensor::{Tensor, TensorData};

use super::*;

fn t(v: &[f64]) -> Tensor<Flex, 1> {
    let v: Vec<f32> = v.iter().map(|&x| x as f32).collect();
    Tensor::from_data(TensorData::new(v.clone(), [v.len()]), &Default::default())
}

fn host(x: Tensor<Flex, 1>) -> Vec<f64> {
    x.into_data().convert::<f64>().to_vec().unwrap()
}

fn log_sigmoid(x: f64) -> f64 {
    -(1.0 + (-x).exp()).ln()
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

fn assert_close(got: f64, want: f64, what: &str) {
    assert!((got - want).abs() <= 1e-5 * want.abs().max(1.0), "{what}: {got} vs {want}");
}

/// A batch of pairs as host values; `None` references for reference-free inputs.
#[derive(Clone)]
struct Pairs {
    chosen: Vec<f64>,
    rejected: Vec<f64>,
    ref_chosen: Option<Vec<f64>>,
    ref_rejected: Option<Vec<f64>>,
    chosen_lengths: Vec<f64>,
    rejected_lengths: Vec<f64>,
    weights: Option<Vec<f64>>,
}

impl Pairs {
    fn reference_free(chosen: &[f64], rejected: &[f64], chosen_lengths: &[f64], rejected_lengths: &[f64]) -> Self {
        Self {
            chosen: chosen.to_vec(),
            rejected: rejected.to_vec(),
            ref_chosen: None,
            ref_rejected: None,
            chosen_lengths: chosen_lengths.to_vec(),
            rejected_lengths: rejected_lengths.to_vec(),
            weights: None,
        }
    }

    /// Log-ratios r_w = [1, -0.5], r_l = [-0.5, 1], so Δ = [1.5, -1.5]; the second rejected
    /// completion is empty (length 0 counts as 1).
    fn with_reference() -> Self {
        Self {
            ref_chosen: Some(vec![-5.0, -1.5]),
            ref_rejected: Some(vec![-5.5, -2.0]),
            ..Self::reference_free(&[-4.0, -2.0], &[-6.0, -1.0], &[2.0, 4.0], &[3.0, 0.0])
        }
    }

    fn inputs(&self) -> PairInputs<Flex> {
        PairInputs {
            chosen_logps: t(&self.chosen),
            rejected_logps: t(&self.rejected),
            ref_chosen_logps: self.ref_chosen.as_deref().map(t),
            ref_rejected_logps: self.ref_rejected.as_deref().map(t),
            chosen_lengths: t(&self.chosen_lengths),
            rejected_lengths: t(&self.rejected_lengths),
            weights: self.weights.as_deref().map(t),
        }
    }

    fn logratios(&self) -> (Vec<f64>, Vec<f64>) {
        let diff = |a: &[f64], b: &Option<Vec<f64>>| a.iter().enumerate().map(|(i, x)| x - b.as_ref().map_or(0.0, |b| b[i])).collect();
        (diff(&self.chosen, &self.ref_chosen), diff(&self.rejected, &self.ref_rejected))
    }
}

fn evaluate(config: &ObjectiveConfig, pairs: &Pairs) -> ObjectiveOutput<Flex> {
    preference_loss(config, &pairs.inputs(), &mut ObjectiveState::default(), false)
}

fn loss(config: &ObjectiveConfig, pairs: &Pairs) -> f64 {
    host(evaluate(config, pairs).loss)[0]
}

const BETA: f64 = 0.5;
const EPSILON: f64 = 0.1;

fn config(kind: LossType) -> ObjectiveConfig {
    ObjectiveConfig { loss_type: vec![kind], beta: BETA, label_smoothing: EPSILON, ..Default::default() }
}

/// −(1−ε)·log σ(βx) − ε·log σ(−βx)
fn smoothed(x: f64) -> f64 {
    -(1.0 - EPSILON) * log_sigmoid(BETA * x) - EPSILON * log_sigmoid(-BETA * x)
}

/// A per-pair loss of (r_w, r_l, m).
type PairFormula<'a> = &'a dyn Fn(f64, f64, f64) -> f64;

/// Per-pair formulas of the objectives that see one pair at a time: (r_w, r_l, m) ↦ loss, with
/// m the per-token log-ratio margin r_w/len_w − r_l/len_l.
#[test]
fn per_pair_objectives_match_their_formulas() {
    let (b, e) = (BETA, EPSILON);
    let exo = |x: f64| sigmoid(x) * (log_sigmoid(x) - (1.0 - e).ln()) + sigmoid(-x) * (log_sigmoid(-x) - e.ln());
    let discopop = |x: f64| {
        let m = sigmoid(x / 0.05);
        -log_sigmoid(x) * (1.0 - m) + (-x).exp() * m
    };
    let cases: [(LossType, PairFormula); 11] = [
        (LossType::Sigmoid, &|w, l, _| -log_sigmoid(b * (w - l))),
        (LossType::Hinge, &|w, l, _| (1.0 - b * (w - l)).max(0.0)),
        (LossType::Ipo, &|_, _, m| (m - 1.0 / (2.0 * b)).powi(2)),
        (LossType::ExoPair, &|w, l, _| exo(b * (w - l))),
        (LossType::NcaPair, &|w, l, _| -log_sigmoid(b * w) - 0.5 * log_sigmoid(-b * w) - 0.5 * log_sigmoid(-b * l)),
        (LossType::Robust, &|w, l, _| (-(1.0 - e) * log_sigmoid(b * (w - l)) + e * log_sigmoid(-b * (w - l))) / (1.0 - 2.0 * e)),
        (LossType::SppoHard, &|w, l, _| (w - 0.5 / b).powi(2) + (l + 0.5 / b).powi(2)),
        (LossType::ApoZero, &|w, l, _| 1.0 - sigmoid(b * w) + sigmoid(b * l)),
        (LossType::ApoDown, &|w, l, _| sigmoid(b * w) + 1.0 - sigmoid(b * (w - l))),
        (LossType::Discopop, &|w, l, _| discopop(b * (w - l))),
        (LossType::SigmoidNorm, &|_, _, m| -log_sigmoid(b * m)),
    ];
    let pairs = Pairs::with_reference();
    let (chosen, rejected) = pairs.logratios();
    let margins: Vec<f64> = (0..2).map(|i| chosen[i] / pairs.chosen_lengths[i] - rejected[i] / pairs.rejected_lengths[i].max(1.0)).collect();
    for (kind, formula) in cases {
        let want = mean(&[formula(chosen[0], rejected[0], margins[0]), formula(chosen[1], rejected[1], margins[1])]);
        assert_close(loss(&config(kind), &pairs), want, kind.name());
    }
    // β·log-ratios as rewards
    let out = evaluate(&config(LossType::Sigmoid), &pairs);
    assert_eq!((host(out.chosen_rewards), host(out.rejected_rewards)), (vec![0.5, -0.25], vec![-0.25, 0.5]));
    // EXO takes ε = 1e-3 without label smoothing
    let x = b * 1.5;
    let exo_default = |x: f64| sigmoid(x) * (log_sigmoid(x) - (1.0f64 - 1e-3).ln()) + sigmoid(-x) * (log_sigmoid(-x) - 1e-3f64.ln());
    let no_smoothing = ObjectiveConfig { label_smoothing: 0.0, ..config(LossType::ExoPair) };
    assert_close(loss(&no_smoothing, &pairs), mean(&[exo_default(x), exo_default(-x)]), "exo_pair, ε = 0");
}

/// Δ as a function of (r_w, r_l).
type Logit<'a> = &'a dyn Fn(f64, f64) -> f64;

#[test]
fn f_divergences_change_the_preference_logit() {
    let pairs = Pairs::with_reference();
    let (chosen, rejected) = pairs.logratios();
    let softplus = |x: f64| (1.0 + x.exp()).ln();
    let a = 0.4;
    let cases: [(FDivergence, Logit); 4] = [
        (FDivergence::ReverseKl, &|w, l| w - l),
        (FDivergence::ForwardKl, &|w, l| (-l).exp() - (-w).exp()),
        (FDivergence::JsDivergence, &|w, l| (w - l) - (softplus(w) - softplus(l))),
        (FDivergence::AlphaDivergence, &|w, l| ((-a * l).exp() - (-a * w).exp()) / a),
    ];
    for (divergence, delta) in cases {
        let config = ObjectiveConfig { f_divergence_type: divergence, f_alpha_divergence_coef: a, ..config(LossType::Sigmoid) };
        let want = mean(&[-log_sigmoid(BETA * delta(chosen[0], rejected[0])), -log_sigmoid(BETA * delta(chosen[1], rejected[1]))]);
        assert_close(loss(&config, &pairs), want, &format!("{divergence:?}"));
    }
}

#[test]
fn aot_compares_sorted_margins() {
    // policy margins [2, -1] against reference margins [0.5, 0.5]; log-ratios [1, -0.5] vs [-0.5, 1]
    let pairs = Pairs::with_reference();
    let aot = mean(&[smoothed(-1.0 - 0.5), smoothed(2.0 - 0.5)]);
    assert_close(loss(&config(LossType::Aot), &pairs), aot, "aot");
    let unpaired = mean(&[smoothed(-0.5 - -0.5), smoothed(1.0 - 1.0)]);
    assert_close(loss(&config(LossType::AotUnpaired), &pairs), unpaired, "aot_unpaired");
}

#[test]
fn bco_pair_learns_its_reward_mean_only_when_training() {
    let pairs = Pairs::with_reference();
    let (chosen, rejected) = pairs.logratios();
    let bco = |delta: f64| mean(&[0, 1].map(|i| -log_sigmoid(BETA * chosen[i] - delta) - log_sigmoid(-(BETA * rejected[i] - delta))));
    let mut state = ObjectiveState::default();
    let config = config(LossType::BcoPair);
    let train = |state: &mut ObjectiveState| host(preference_loss(&config, &pairs.inputs(), state, true).loss)[0];
    // batch mean of β·[r_w, r_l] = 0.5·(1 − 0.5 − 0.5 + 1)/4 = 0.125; RunningMoments's first value is that mean
    assert_close(train(&mut state), bco(0.125), "first step");
    assert_eq!(state, ObjectiveState { bco_mean: 0.125, bco_count: 1.0 });
    train(&mut state);
    assert_eq!(state, ObjectiveState { bco_mean: 0.125, bco_count: 2.0 });
    let mut frozen = ObjectiveState { bco_mean: 0.3, bco_count: 5.0 };
    let evaluated = host(preference_loss(&config, &pairs.inputs(), &mut frozen, false).loss)[0];
    assert_close(evaluated, bco(0.3), "evaluation");
    assert_eq!(frozen, ObjectiveState { bco_mean: 0.3, bco_count: 5.0 });
}

#[test]
fn kto_pair_compares_each_side_with_the_other_sides_mean() {
    // mean r_w = 0.25 (chosen KL), mean r_l = 0.25 (rejected KL)
    let pairs = Pairs::with_reference();
    let (chosen, rejected) = pairs.logratios();
    let losses: Vec<f64> = chosen.iter().map(|w| 1.0 - sigmoid(BETA * (w - 0.25))).chain(rejected.iter().map(|l| 1.0 - sigmoid(BETA * (0.25 - l)))).collect();
    assert_close(loss(&config(LossType::KtoPair), &pairs), mean(&losses), "kto_pair");
    // negative batch means are clamped at 0
    let direct = host(kto_pair(t(&[-1.0, -2.0]), t(&[-3.0, -1.0]), 1.0));
    let want = [1.0 - sigmoid(-1.0), 1.0 - sigmoid(-2.0), 1.0 - sigmoid(3.0), 1.0 - sigmoid(1.0)];
    for (got, want) in direct.iter().zip(want) {
        assert_close(*got, want, "kto_pair, clamped KL");
    }
}

#[test]
fn sft_rpo_weights_and_wpo_combine_as_trl_does() {
    let mut pairs = Pairs::with_reference();
    // SFT: the batch token mean −(−4 − 2)/(2 + 4)
    assert_close(loss(&config(LossType::Sft), &pairs), 1.0, "sft");
    let sigmoid_loss = loss(&config(LossType::Sigmoid), &pairs);
    let hinge_loss = loss(&config(LossType::Hinge), &pairs);
    let mixed = ObjectiveConfig { loss_type: vec![LossType::Sigmoid, LossType::Hinge], loss_weights: vec![0.3, 2.0], ..config(LossType::Sigmoid) };
    assert_close(loss(&mixed, &pairs), 0.3 * sigmoid_loss + 2.0 * hinge_loss, "loss_weights");
    // RPO: the mean of per-sequence token means, 4/2 and 2/4
    let rpo = ObjectiveConfig { rpo_alpha: Some(0.7), ..config(LossType::Sigmoid) };
    assert_close(loss(&rpo, &pairs), sigmoid_loss + 0.7 * 1.25, "rpo_alpha");
    pairs.weights = Some(vec![0.2, 0.6]);
    let wpo = ObjectiveConfig { use_weighting: true, ..config(LossType::Hinge) };
    let want = mean(&[0.2 * (1.0 - BETA * 1.5f64).max(0.0), 0.6 * (1.0 + BETA * 1.5)]);
    assert_close(loss(&wpo, &pairs), want, "use_weighting");
}

#[test]
fn simpo_matches_its_formula() {
    let pairs = Pairs::reference_free(&[-4.0], &[-9.0], &[2.0], &[3.0]);
    let config = ObjectiveConfig { loss_type: vec![LossType::Simpo], beta: 2.0, label_smoothing: 0.1, ..Default::default() };
    let out = evaluate(&config, &pairs);
    // averages -2 vs -3; β = 2, γ = 0.5: smoothed −log σ(2·(1 − 0.25))
    let x = 2.0 * (1.0 - 0.25);
    assert_close(host(out.loss)[0], -0.9 * log_sigmoid(x) - 0.1 * log_sigmoid(-x), "simpo");
    assert_eq!(host(out.chosen_rewards), vec![-4.0], "rewards are β·avg logp");
}

fn cpo(variant: CpoVariant, cpo_alpha: f64, alphapo_alpha: f64) -> ObjectiveConfig {
    ObjectiveConfig { loss_type: vec![LossType::Cpo], beta: 2.0, cpo_loss_type: variant, cpo_alpha, alphapo_alpha, ..Default::default() }
}

#[test]
fn cpo_adds_the_chosen_nll() {
    let pairs = Pairs::reference_free(&[-4.0, -2.0], &[-5.0, -6.0], &[2.0, 2.0], &[1.0, 1.0]);
    let out = evaluate(&cpo(CpoVariant::Sigmoid, 1.0, 0.0), &pairs);
    let preference = (-log_sigmoid(2.0) - log_sigmoid(8.0)) / 2.0;
    assert_close(host(out.loss)[0], preference + 6.0 / 4.0, "sigmoid + token-mean NLL");
    assert_eq!(out.extra, vec![("nll_loss".to_string(), 1.5)]);
}

#[test]
fn cpo_variants_match_their_formulas() {
    // sums -4 vs -6 over lengths 2 and 3: averages -2 vs -2; β = 2
    let pairs = Pairs::reference_free(&[-4.0], &[-6.0], &[2.0], &[3.0]);
    let with = |config: ObjectiveConfig| {
        let out = preference_loss(&config, &pairs.inputs(), &mut ObjectiveState::default(), true);
        (host(out.loss)[0], host(out.chosen_rewards)[0], out.extra)
    };
    let (hinge, reward, _) = with(cpo(CpoVariant::Hinge, 0.0, 0.0));
    assert!(hinge.abs() < 1e-6 && (reward - -8.0).abs() < 1e-5, "relu(1 - 2·2) = 0: {hinge}, rewards β·sum: {reward}");
    let (ipo, reward, extra) = with(cpo(CpoVariant::Ipo, 0.0, 0.0));
    assert!((ipo - 0.0625).abs() < 1e-6 && (reward - -4.0).abs() < 1e-5, "(0 - 1/4)²: {ipo}; rewards β·avg: {reward}");
    assert_eq!(extra, vec![("logps/chosen".to_string(), -2.0), ("logps/rejected".to_string(), -2.0)], "averaged variants log averages");
    let (simpo, _, _) = with(cpo(CpoVariant::Simpo, 0.0, 0.0));
    assert_close(simpo, -log_sigmoid(2.0 * (0.0 - 0.25)), "simpo variant");
    let (nll, _, _) = with(cpo(CpoVariant::Ipo, 1.0, 0.0));
    assert_close(nll, 0.0625 + 2.0, "token-mean chosen NLL 4/2 added");
    // AlphaPO: r = (1 − exp(−α·avg)) / α on averages -2 and -1, and no NLL term
    let pairs = Pairs::reference_free(&[-4.0], &[-2.0], &[2.0], &[2.0]);
    let out = evaluate(&cpo(CpoVariant::Alphapo, 1.0, 0.5), &pairs);
    let r = |x: f64| (1.0 - (-0.5 * x).exp()) / 0.5;
    assert_close(host(out.loss)[0], -log_sigmoid(2.0 * (r(-2.0) - r(-1.0) - 0.25)), "alphapo");
    assert_close(host(out.chosen_rewards)[0], 2.0 * r(-2.0), "alphapo rewards");
}

#[test]
fn orpo_matches_its_formula_and_logs_its_metrics() {
    let pairs = Pairs::reference_free(&[-1.0], &[-4.0], &[2.0], &[2.0]);
    let out = evaluate(&ObjectiveConfig { loss_type: vec![LossType::Orpo], beta: 2.0, ..Default::default() }, &pairs);
    let odds = |a: f64| a - (1.0 - a.exp()).ln();
    let log_odds = odds(-0.5) - odds(-2.0);
    assert_close(host(out.loss)[0], 0.5 - 2.0 * log_sigmoid(log_odds), "orpo");
    let names: Vec<&str> = out.extra.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(names, vec!["log_odds_ratio", "log_odds_chosen", "nll_loss"]);
    assert_close(out.extra[1].1, log_odds, "log_odds_chosen");
}

#[test]
fn the_first_loss_type_decides_the_rewards() {
    let pairs = Pairs::reference_free(&[-4.0], &[-6.0], &[2.0], &[3.0]);
    let rewards = |loss_type: Vec<LossType>| host(evaluate(&ObjectiveConfig { loss_type, beta: 2.0, ..Default::default() }, &pairs).chosen_rewards)[0];
    assert_eq!(rewards(vec![LossType::Simpo, LossType::Sigmoid]), -4.0, "β·average");
    assert_eq!(rewards(vec![LossType::Sigmoid, LossType::Simpo]), -8.0, "β·log-ratio");
}

#[test]
#[should_panic(expected = "kto trains on unpaired rows")]
fn unpaired_types_have_no_pairwise_loss() {
    loss(&config(LossType::Kto), &Pairs::with_reference());
}

#[test]
fn kto_matches_hand_computed_values() {
    let config = ObjectiveConfig { loss_type: vec![LossType::Kto], beta: 0.5, desirable_weight: 1.0, undesirable_weight: 2.0, ..Default::default() };
    // log-ratios 2 (desirable) and 1 (undesirable), KL 0.4
    let out = kto_loss(&config, t(&[-1.0, -3.0]), t(&[-3.0, -4.0]), &[true, false], 0.4);
    let want = ((1.0 - sigmoid(0.5 * (2.0 - 0.4))) + 2.0 * (1.0 - sigmoid(0.5 * (0.4 - 1.0)))) / 2.0;
    assert_close(host(out.loss)[0], want, "kto");
    assert_eq!(host(out.rewards), vec![1.0, 0.5]);
    // a negative KL estimate is clamped at 0; apo_zero_unpaired ignores it
    assert_eq!(kto_loss(&config, t(&[-1.0]), t(&[-1.0]), &[true], -3.0).kl, 0.0);
    let apo = ObjectiveConfig { loss_type: vec![LossType::ApoZeroUnpaired], beta: 0.5, ..Default::default() };
    let out = kto_loss(&apo, t(&[-1.0, -3.0]), t(&[-3.0, -4.0]), &[true, false], 0.4);
    assert_eq!(out.kl, 0.0);
    assert_close(host(out.loss)[0], ((1.0 - sigmoid(1.0)) + sigmoid(0.5)) / 2.0, "apo_zero_unpaired");
}
