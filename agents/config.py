"""What an agent is: the config sections of the agent (`agent:` with its optimiser and
spectral normalisation), its replay (`replay:`) and its probes (`probe:`), every field
typed and documented, and their checks (`validate_agent`).

What a run is (`run:`, `distributed:`, `regime:`, the whole `Config`) and reading a
YAML file into it are launch/config.py's; its `validate`, which every loader calls,
runs these checks with its own. Plain Python: reading a config imports no JAX.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Literal

from eosrl.agents import kinds


class ConfigError(ValueError):
    """A config value that cannot run; the message names the key."""


@dataclass
class OptimizerConfig:
    name: Literal["sgd", "rmsprop", "adam"] = "adam"
    """`sgd` (optionally heavy-ball or Nesterov momentum), `rmsprop` or `adam`."""
    lr: float = 1e-3
    """Learning rate (the initial value when `lr_schedule` is not constant); with
    `step_size_rule: corridor`, the cap on the rule's η_t. `drift_adjusted` does not use it
    (its cap is `dal_max_lr`) unless `dal_power` is 0, as the authors' `static_lr`."""
    lr_schedule: Literal["constant", "linear"] = "constant"
    """`constant` or `linear` (from `lr` to `lr_end` over `lr_decay_updates` updates)."""
    lr_end: float = 0.0
    """Final learning rate of the `linear` schedule."""
    lr_decay_updates: int = 0
    """Updates over which the `linear` schedule decays."""
    momentum: float = 0.0
    """SGD momentum β (heavy ball v ← βv + g); 0 is plain SGD."""
    nesterov: bool = False
    """Use Nesterov momentum with SGD."""
    decay: float = 0.95
    """RMSProp second-moment decay ρ."""
    centered: bool = False
    """Centred RMSProp (divide by the variance instead of the second moment)."""
    b1: float = 0.9
    """Adam first-moment decay β₁."""
    b2: float = 0.999
    """Adam second-moment decay β₂."""
    eps: float = 1e-8
    """Adam / RMSProp ε added to the denominator."""
    max_grad_norm: float = 0.0
    """Clip gradients to this global norm before the optimiser; 0 disables clipping."""
    step_size_rule: Literal["constant", "drift_adjusted", "corridor"] = "constant"
    """How the step size η_t of each update is chosen (agents/step_sizes.py; `sgd` only):
    `constant` (`lr` and its schedule); `drift_adjusted` (DAL of Rosca et al., 2023, as their
    released code has it: η_t = min(2 / (‖Hg‖/‖g‖)^p, `dal_max_lr`), which may be longer than
    `lr`; one Hessian-vector product per update); `corridor` (Dherin & Rosca, 2024, a Polyak
    step: η_t = min(c·L/‖g‖², lr)). Probes compare λ₁ with the threshold of the last η_t
    (agents/thresholds.py says why the last)."""
    dal_power: float = 1.0
    """p of `drift_adjusted`: larger p shrinks steps more where the drift ‖Hg‖/‖g‖ > 1
    (the paper's trade-off between stability and progress). p = 0 is plain SGD at `lr`,
    as in the authors' code (their `scaling_power` 0 leaves the gradient unscaled)."""
    dal_max_lr: float = 5.0
    """The cap on `drift_adjusted`'s η_t, an absolute step size (not a multiple of `lr`): the
    authors' `max_lr_scale`, default 5, which their code divides by `static_lr` before clipping
    the multiplier of `static_lr` (dal.py lines 61, 97, 108), so their step is at most 5."""
    corridor_scale: float = 1.0
    """c of `corridor` (c = 1 is Polyak's step with the loss's lower bound 0)."""


@dataclass
class SpectralNormConfig:
    layers: str = "none"
    """Layers to normalise: negative indices from the output as in Gogianu et al. (2021)
    (`"-2"` is the penultimate layer, `"-2,-3"`), layer names (`"dense_0"`), `"all"` or `"none"`."""
    mode: Literal["divide", "clip", "log"] = "divide"
    """`divide` (W/σ), `clip` (W/max(1, σ): only shrink) or `log` (measure σ, leave W as it is)."""
    power_iterations: int = 1
    """Power-iteration steps per learner update; the vectors persist in the network state."""
    conv: Literal["reshape", "operator"] = "reshape"
    """σ of a convolution: `reshape` (norm of the kernel reshaped to a matrix, the usual
    approximation) or `operator` (true operator norm of the convolution for its input shape)."""
    scale_lr: bool = False
    """Step-size ablation of the paper: divide each selected layer's learning rate (its
    optimiser update) by max(1, σ); use with mode `log`, so the function is unchanged
    and only the step size differs. Refused with modes `divide` and `clip`, whose W/σ and
    W/max(1, σ) already divide the layer's gradient, and so its step, by σ > 1."""


@dataclass
class AgentConfig:
    kind: str = "dqn"
    """The agent, a name in the registry of agents/kinds.py: `dqn` (Huber TD loss), `c51`
    (categorical cross-entropy loss) or `qrdqn` (quantile Huber loss). Its fields below
    (`huber_delta`; `num_atoms`, `v_min`, `v_max`; `num_quantiles`) name it."""
    network: Literal["auto", "mlp", "minatar_cnn", "nature_cnn"] = "auto"
    """`mlp`, `minatar_cnn`, `nature_cnn`, or `auto` (chosen from the env kind)."""
    hidden_sizes: List[int] = field(default_factory=lambda: [64, 64])
    """Hidden layer widths of the `mlp` network."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """The optimiser and its hyperparameters."""
    discount: float = 0.99
    """Per-step discount γ."""
    n_step: int = 1
    """Steps summed in the bootstrapped return."""
    double_q: bool = False
    """Select the bootstrap action with the online network (double DQN / double C51)."""
    huber_delta: float = 1.0
    """δ of the DQN Huber loss (quadratic inside |x| ≤ δ)."""
    num_atoms: int = 51
    """C51 support size."""
    v_min: float = -10.0
    """Lowest C51 atom."""
    v_max: float = 10.0
    """Highest C51 atom."""
    num_quantiles: int = 200
    """QR-DQN quantiles per action, N (Dabney et al., 2018 used 200 on Atari; the loss, a
    sum over them, and its sharpness grow with N: agents/qrdqn.py)."""
    target_update_period: int = 100
    """Learner updates between copies of the online parameters into `target_params`."""
    epsilon_start: float = 1.0
    """ε of the ε-greedy behaviour policy at the first env step."""
    epsilon_end: float = 0.01
    """ε after `epsilon_decay_steps` env steps (linear schedule)."""
    epsilon_decay_steps: int = 10_000
    """Env steps over which ε decays linearly."""
    epsilon_eval: float = 0.001
    """ε used by the evaluator."""
    spectral_norm: SpectralNormConfig = field(default_factory=SpectralNormConfig)
    """Spectral normalisation per layer (none by default)."""
    gradient_penalty: float = 0.0
    """λ of λ·‖∇_θ L_TD‖² added to the TD loss: implicit gradient regularisation made
    explicit (Barrett & Dherin, 2021); 0 disables it. Costs a second backward pass."""
    geometric_complexity_penalty: float = 0.0
    """λ of λ·GC added to the TD loss, GC = mean over the batch of ‖∂q(x)/∂x‖²_F of the
    Q-network (Dherin et al., 2022; the quantity `probe.geometric_complexity_every`
    reports); 0 disables it. Costs one backward pass per action, each slow on CPU (XLA's
    convolution input gradient), hence `geometric_complexity_rows`."""
    geometric_complexity_rows: int = 32
    """Rows of each batch the penalty's GC is computed on (the first ones: batch rows are
    drawn uniformly, so this is an unbiased estimate of the batch's GC); 0 = the whole batch."""


@dataclass
class ReplayConfig:
    capacity: int = 50_000
    """Transitions held in the Reverb `replay` table (FIFO removal beyond this)."""
    min_size: int = 1_000
    """Transitions in replay before the learner starts."""
    batch_size: int = 64
    """Transitions per learner update."""
    update_period: int = 1
    """Env steps per learner update (samples per insert = batch_size / update_period)."""
    record_to: str = ""
    """Record every transition the actor collects to an on-disk dataset at this path
    (docs/dataset_format.md); empty records nothing."""
    checkpoint: bool = True
    """Checkpoint the replay table with each learner checkpoint (Reverb checkpointer), so a
    resumed run continues with its data. Turn off for Atari-sized buffers (gigabytes per copy)."""


@dataclass
class ProbeConfig:
    enabled: bool = False
    """Measure Hessian eigenvalues of the TD loss during training."""
    mode: Literal["inline", "process"] = "inline"
    """`inline`: the learner probes between updates; `process`: `eosrl launch` runs a prober process that
    measures snapshots the learner publishes, while it keeps learning (`eosrl train` always probes inline)."""
    every: int = 100
    """Learner updates between probes."""
    full_every: int = 0
    """Learner updates between full probes (a multiple of `every`; 0: every probe is full). A full probe
    measures the top `num_eigs` eigenvalues, `smallest`, the unscaled λ₁ and the batch sharpness; the probes
    between them measure λ₁ only (k = 1, warm-started from the last probe's top eigenvector, stopped on the
    residual), for a few HVPs: records with `full: false` and one eigenvalue (docs/design.md, Probes)."""
    num_eigs: int = 5
    """Top eigenvalues reported (sorted by value, largest first)."""
    method: Literal["lobpcg", "lanczos"] = "lobpcg"
    """`lobpcg`: block solver started from the previous probe's eigenvectors, stopped at `tolerance`;
    `lanczos`: a cold start each probe, `iterations` Lanczos steps with full reorthogonalisation."""
    tolerance: float = 1e-3
    """An eigenpair counts as converged when ‖Hv − λv‖ ≤ tolerance·|λ₁|; `lobpcg` stops once all are."""
    iterations: int = 30
    """Most solver iterations per probe: block iterations (`lobpcg`) or Lanczos steps (`lanczos`)."""
    smallest: bool = False
    """Also estimate the smallest eigenvalue (negative curvature)."""
    batch: Literal["fixed", "fresh"] = "fixed"
    """`fixed`: one batch drawn when learning starts and reused (kept with the run); `fresh`: a new batch each probe."""
    batch_size: int = 512
    """Transitions in the probe batch, independent of the training batch."""
    max_queued: int = 4
    """`process` mode: snapshots that may wait for the prober (the one being measured included); when
    that many wait, the learner skips the next one (it never waits) and writes a `probe_skipped` event."""
    trace_every: int = 0
    """Learner updates between Hutchinson estimates of tr(H) (a multiple of `every`; 0: never)."""
    hutchinson_samples: int = 10
    """Rademacher probes of Hutchinson's estimator of the Hessian trace."""
    geometric_complexity_every: int = 0
    """Learner updates between measures of the Q-network's geometric complexity (a multiple of `every`; 0: never)."""
    batch_sharpness_batches: int = 0
    """Fresh batches of the training batch size (`replay.batch_size`) each probe also draws to measure the
    batch sharpness E_B[g_Bᵀ H_B g_B / ‖g_B‖²] and the mean λ_max of the batch Hessians (Andreyev &
    Beneventano, 2024), in the step's geometry D^½ H_B D^½ like λ₁; each batch costs a gradient, 1 HVP and
    a one-vector eigensolve, and with a momentum buffer (heavy ball, Adam) 1 HVP more for the batch
    sharpness along the momentum step, `momentum_batch_sharpness` (0: off)."""
    loss_trace_window: int = 0
    """W: the TD loss of every update in windows of W updates, `loss_trace` records (0: off): around
    each target-network copy (W/2 updates before it, W/2 after) and after each probe whose λ₁ ≥ 0.9 of
    the threshold (the next max(W, `probe.every`): until the next probe, so the trace is continuous while
    the probes read λ₁ that near; inline probes), where the edge of stability shows as a period-2 oscillating
    loss that `train` means cannot show (launch/loss_traces.py). Works with `probe.enabled` false too
    (then only the target-copy windows). Costs a float per traced update."""
    gauss_newton_every: int = 0
    """Learner updates between measures of λ₁ of the Gauss–Newton matrix Jᵀ∇²ℓJ of the probe batch
    (`gauss_newton_sharpness`, in λ₁'s geometry; a multiple of `every`; 0: never): a one-vector
    eigensolve of products that each cost about one HVP (a jvp, an output-space HVP, a vjp)."""
    layer_every: int = 0
    """Learner updates between measures of λ₁ of each layer's diagonal block of the Hessian
    (`layer_sharpness`; a multiple of `every`; 0: never): a one-vector eigensolve per layer."""
    dataset_every: int = 0
    """Offline runs (`regime.mode: offline`): learner updates between measures of λ₁ of the mean loss
    over the dataset (`dataset_sharpness`; a multiple of `every`; 0: never), by HVPs summed over chunks
    of `batch_size` transitions: each product costs `dataset_transitions`/`batch_size` probe-batch HVPs."""
    dataset_transitions: int = 0
    """Transitions of the dataset that `dataset_every` measures over: 0 all valid ones, else that many
    drawn uniformly without replacement once per run (from `run.seed`; a 500k-transition dataset at 20
    solver iterations is slow whole on a CPU)."""


# ----------------------------------------------------------------------------
# Values that type-check but cannot run.


def _positive(key: str, value, allow_zero: bool = False) -> None:
    # `not value >= 0` also catches NaN, which passes every ordered comparison's negation.
    if not value >= 0 or (value == 0 and not allow_zero) or value == math.inf:
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{key}: must be {bound}, got {value}")


def _validate_probe(p: ProbeConfig, capacity: int) -> None:
    _positive("probe.every", p.every)
    _positive("probe.num_eigs", p.num_eigs)
    _positive("probe.batch_size", p.batch_size)
    _positive("probe.hutchinson_samples", p.hutchinson_samples)
    _positive("probe.iterations", p.iterations)
    _positive("probe.max_queued", p.max_queued)
    _positive("probe.batch_sharpness_batches", p.batch_sharpness_batches, allow_zero=True)
    _positive("probe.loss_trace_window", p.loss_trace_window, allow_zero=True)
    if not 0.0 < p.tolerance < 1.0:
        raise ConfigError(f"probe.tolerance: must be in (0, 1), got {p.tolerance}")
    if p.method == "lanczos" and p.iterations < p.num_eigs:
        raise ConfigError(f"probe.iterations: {p.iterations} is fewer than probe.num_eigs {p.num_eigs}")
    _positive("probe.full_every", p.full_every, allow_zero=True)
    if p.full_every % p.every:
        raise ConfigError(f"probe.full_every: {p.full_every} is not a multiple of probe.every {p.every} "
                          "(0: every probe is full)")
    _positive("probe.dataset_transitions", p.dataset_transitions, allow_zero=True)
    for name in ("trace_every", "geometric_complexity_every", "gauss_newton_every", "layer_every",
                 "dataset_every"):
        every = getattr(p, name)
        _positive(f"probe.{name}", every, allow_zero=True)
        if every % p.every:
            raise ConfigError(f"probe.{name}: {every} is not a multiple of probe.every {p.every} (0: never)")
    if p.enabled and p.batch_size > capacity:
        raise ConfigError(f"probe.batch_size: {p.batch_size} is larger than replay.capacity {capacity}")


def parse_subset(subset: str) -> tuple:
    """("all", None) or (mode, N) from `regime.subset`, e.g. "first 100000"."""
    parts = str(subset).split()
    if parts == ["all"]:
        return "all", None
    if len(parts) == 2 and parts[0] in ("first", "last", "random") and parts[1].isdigit() and int(parts[1]) > 0:
        return parts[0], int(parts[1])
    raise ConfigError(f"regime.subset: {subset!r} is not one of 'all', 'first N', 'last N', 'random N'")


def _validate_optimizer(o: OptimizerConfig) -> None:
    _positive("agent.optimizer.lr", o.lr)
    _positive("agent.optimizer.lr_end", o.lr_end, allow_zero=True)
    if o.lr_schedule == "linear":
        _positive("agent.optimizer.lr_decay_updates", o.lr_decay_updates)
    for key in ("momentum", "decay", "b1", "b2"):
        value = getattr(o, key)
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"agent.optimizer.{key}: must be in [0, 1), got {value}")
    if o.nesterov and o.momentum == 0:
        raise ConfigError("agent.optimizer.nesterov: needs agent.optimizer.momentum > 0")
    _positive("agent.optimizer.eps", o.eps)
    _positive("agent.optimizer.max_grad_norm", o.max_grad_norm, allow_zero=True)
    if o.step_size_rule != "constant":
        if o.name != "sgd":
            raise ConfigError(f"agent.optimizer.step_size_rule: {o.step_size_rule} is a rule for sgd "
                              f"(with or without momentum), not {o.name}")
        if o.lr_schedule != "constant":
            raise ConfigError(f"agent.optimizer.lr_schedule: must be constant with step_size_rule "
                              f"{o.step_size_rule} (the rule sets each step)")
    _positive("agent.optimizer.dal_power", o.dal_power, allow_zero=True)
    _positive("agent.optimizer.dal_max_lr", o.dal_max_lr)
    _positive("agent.optimizer.corridor_scale", o.corridor_scale)


def validate_agent(a: AgentConfig, r: ReplayConfig, p: ProbeConfig) -> None:
    """The checks of the agent's sections (agent, replay, probe); the run's `validate`
    (launch/config.py), which every loader calls, calls them with its own."""
    _validate_optimizer(a.optimizer)
    _positive("agent.gradient_penalty", a.gradient_penalty, allow_zero=True)
    _positive("agent.geometric_complexity_penalty", a.geometric_complexity_penalty, allow_zero=True)
    _positive("agent.geometric_complexity_rows", a.geometric_complexity_rows, allow_zero=True)
    if not 0.0 <= a.discount <= 1.0:
        raise ConfigError(f"agent.discount: must be in [0, 1], got {a.discount}")
    _positive("agent.n_step", a.n_step)
    if a.kind not in kinds.REGISTRY:
        raise ConfigError(f"agent.kind: unknown kind {a.kind!r} (registered: {', '.join(kinds.REGISTRY)})")
    _positive("agent.huber_delta", a.huber_delta)
    _positive("agent.num_quantiles", a.num_quantiles)
    if a.num_atoms < 2:
        raise ConfigError(f"agent.num_atoms: must be >= 2, got {a.num_atoms}")
    if a.v_min >= a.v_max:
        raise ConfigError(f"agent.v_min: must be below agent.v_max ({a.v_min} >= {a.v_max})")
    if not a.hidden_sizes or any(h <= 0 for h in a.hidden_sizes):
        raise ConfigError(f"agent.hidden_sizes: must be a non-empty list of positive widths, got {a.hidden_sizes}")
    _positive("agent.target_update_period", a.target_update_period)
    for key in ("epsilon_start", "epsilon_end", "epsilon_eval"):
        value = getattr(a, key)
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"agent.{key}: must be in [0, 1], got {value}")
    _positive("agent.epsilon_decay_steps", a.epsilon_decay_steps, allow_zero=True)
    sn = a.spectral_norm
    _positive("agent.spectral_norm.power_iterations", sn.power_iterations)
    if sn.scale_lr and sn.mode in ("divide", "clip"):
        raise ConfigError(f"agent.spectral_norm.scale_lr: divides each SN layer's step by max(1, σ), which "
                          f"agent.spectral_norm.mode {sn.mode} already does where σ > 1 (the layer uses "
                          f"W/max(1, σ) or W/σ, so its gradient carries that factor); set mode log (the paper's "
                          f"ablation) or scale_lr false")
    _positive("replay.capacity", r.capacity)
    _positive("replay.min_size", r.min_size)
    _positive("replay.batch_size", r.batch_size)
    _positive("replay.update_period", r.update_period)
    if r.batch_size > r.min_size:
        raise ConfigError(f"replay.batch_size: {r.batch_size} is larger than replay.min_size {r.min_size}")
    if r.min_size > r.capacity:
        raise ConfigError(f"replay.min_size: {r.min_size} is larger than replay.capacity {r.capacity}")
    _validate_probe(p, r.capacity)
