"""Attacks: the evidence of what each of veil's defences stops, and what it does not.

Nothing in veil's core imports this package; it reads models and released tensors the
way an adversary would.

- Gradient inversion (:mod:`~veil.attacks.gradient_inversion`, views in
  :mod:`~veil.attacks.views`): DLG and iDLG against one client's upload as veil's
  own modules release it (:mod:`~veil.attacks.releases`): a FedAvg update, a DP-SGD
  step, a sparse DSSGD upload, a DP-FedAvg result, a secure aggregation message or
  sum.
- Membership inference (:mod:`~veil.attacks.membership`): loss threshold and
  difficulty-calibrated scores, with the bounds the model's epsilon implies.
- Representation inversion (:mod:`~veil.attacks.representation`): a decoder from
  perturbed device-part representations back to inputs (private inference).
- Auditing (:mod:`~veil.attacks.audit`): an empirical lower bound on epsilon from a
  canary, checked against the accountant's claim.
- Metrics (:mod:`~veil.attacks.metrics`): MSE, PSNR, SSIM, label accuracy, AUC,
  advantage, TPR at low FPR, and the (epsilon, delta) bounds.
"""

from veil.attacks.audit import (
    AuditResult,
    Release,
    audit_epsilon,
    clopper_pearson_upper,
    dpfedavg_canary_release,
    dpsgd_canary_release,
    epsilon_from_rates,
)
from veil.attacks.gradient_inversion import (
    InversionConfig,
    Reconstruction,
    analytic_first_layer,
    infer_labels,
    invert_gradients,
    last_linear,
)
from veil.attacks.membership import (
    MembershipReport,
    calibrated_scores,
    loss_threshold_scores,
    membership_report,
    per_example_losses,
)
from veil.attacks.metrics import (
    MembershipMetrics,
    dp_advantage_bound,
    dp_tpr_bound,
    label_accuracy,
    membership_metrics,
    mse,
    psnr,
    roc_curve,
    ssim,
)
from veil.attacks.releases import (
    ClientRelease,
    SecAggRound,
    dp_fedavg_client_release,
    dp_fedavg_model_release,
    dpsgd_release,
    dssgd_release,
    fedavg_release,
    secagg_round,
)
from veil.attacks.representation import (
    Device,
    Perturbation,
    invert_representations,
    laplace_perturbation,
    mlp_decoder,
    train_decoder,
)
from veil.attacks.views import ObservedUpdate, plain_view

__all__ = [
    "AuditResult",
    "ClientRelease",
    "Device",
    "InversionConfig",
    "MembershipMetrics",
    "MembershipReport",
    "ObservedUpdate",
    "Perturbation",
    "Reconstruction",
    "Release",
    "SecAggRound",
    "analytic_first_layer",
    "audit_epsilon",
    "calibrated_scores",
    "clopper_pearson_upper",
    "dp_advantage_bound",
    "dp_fedavg_client_release",
    "dp_fedavg_model_release",
    "dp_tpr_bound",
    "dpfedavg_canary_release",
    "dpsgd_canary_release",
    "dpsgd_release",
    "dssgd_release",
    "epsilon_from_rates",
    "fedavg_release",
    "infer_labels",
    "invert_gradients",
    "invert_representations",
    "label_accuracy",
    "laplace_perturbation",
    "last_linear",
    "loss_threshold_scores",
    "membership_metrics",
    "membership_report",
    "mlp_decoder",
    "mse",
    "per_example_losses",
    "plain_view",
    "psnr",
    "roc_curve",
    "secagg_round",
    "ssim",
    "train_decoder",
]
