"""Attacks: the evidence of what each of veil's defences stops, and what it does not.

Nothing in veil's core imports this package; it reads models and released tensors the
way an adversary would.

- Gradient inversion (:mod:`~veil.attacks.gradient_inversion`, views in
  :mod:`~veil.attacks.views`): DLG and iDLG against one client's upload, plain or
  through DP-SGD, a sparse DSSGD upload, a DP-FedAvg contribution or a secure
  aggregation sum.
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
from veil.attacks.representation import (
    Device,
    Perturbation,
    invert_representations,
    laplace_perturbation,
    mlp_decoder,
    train_decoder,
)
from veil.attacks.views import (
    ObservedUpdate,
    clipped_noised_view,
    dpsgd_view,
    plain_view,
    sparse_view,
    summed_view,
)

__all__ = [
    "AuditResult",
    "Device",
    "InversionConfig",
    "MembershipMetrics",
    "MembershipReport",
    "ObservedUpdate",
    "Perturbation",
    "Reconstruction",
    "Release",
    "audit_epsilon",
    "calibrated_scores",
    "clipped_noised_view",
    "clopper_pearson_upper",
    "dp_advantage_bound",
    "dp_tpr_bound",
    "dpfedavg_canary_release",
    "dpsgd_canary_release",
    "dpsgd_view",
    "epsilon_from_rates",
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
    "sparse_view",
    "ssim",
    "summed_view",
    "train_decoder",
]
