"""MeanFlow on RAE latents: one- and few-step generation (Geng et al. 2025, "Mean Flows for One-step Generative
Modeling"; MF-RAE, arXiv 2511.13019, code sony/mf-rae).

Time convention as :mod:`rae_cli.flow`: t = 0 data, t = 1 noise, z_t = (1 − t)·x + t·ε, v = ε − x. A MeanFlow model
u(z, r, t) (a DiT built with ``dit.second_time``) predicts the *average* velocity over [r, t]:

    u(z_t, r, t) = 1/(t − r) ∫_r^t v(z_τ, τ) dτ,   so   z_r = z_t − (t − r)·u(z_t, r, t).

Training regresses u onto the stop-gradient target of the MeanFlow identity

    u_tgt = ṽ − (t − r)·du/dt,   du/dt = ∂_z u·ṽ + ∂_t u   (a Jacobian-vector product with tangent (ṽ, 0, 1) in (z, r, t)),

where ṽ is the velocity of the path: the conditional ε − x, or guidance folded in (:func:`target_velocity`), or a
frozen flow-matching teacher's (guided) velocity (distillation). With r = t the target is ṽ and the loss is flow
matching. One step: x = z_1 − u(z_1, 0, 1).

How du/dt is computed (``meanflow.derivative``):
- ``jvp``: ``torch.func.jvp`` (forward-mode AD) under the math SDPA kernel (the fused CPU/GPU attention kernels have
  no forward-AD formula). Without DDP the JVP's primal output is the prediction that is trained (one pass). Under
  DDP (or torch.compile, or activation checkpointing) forward-mode AD cannot run through the wrapper, so the JVP runs
  on the bare module without gradients (the target is stop-gradient anyway) and the prediction comes from a normal
  forward of the wrapped model — one extra forward, and DDP's gradient all-reduce works unchanged.
- ``finite-difference``: a central difference of step δ along (ṽ, 0, 1), as the MF-RAE code does (two extra
  forwards, no autograd through them).
The double-backward trick is not needed: both ways work everywhere the forward works.

All randomness comes from explicit generators (see :func:`draw_times`), so training stays bit-identical on resume.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from rae_cli.config import ConfigError, doc

log = logging.getLogger(__name__)

SEED_MEANFLOW = 4  # derive_seed stream of the (r, t) draws; train_dit uses 0-3
STAGES = ("meanflow", "consistency")
DERIVATIVES = ("jvp", "finite-difference")


@dataclass
class MeanFlowConfig:
    """MeanFlow training (``objective: meanflow``): (r, t) sampler, loss weighting, folded guidance, stages."""

    stage: str = doc("meanflow: the MeanFlow identity loss (MFT from scratch / MFD with a teacher). consistency: "
                     "MF-RAE's consistency mid-training (CMT) — regress u(x_τi, τj, τi) onto the chords "
                     "(x_τi − x_τj)/(τi − τj) of the teacher's ODE trajectories (needs teacher); run it first, then "
                     "continue with stage meanflow from its checkpoint (init=RUN).", "meanflow")
    ratio_r_neq_t: float = doc("Share of samples with r < t (the rest have r = t, i.e. flow matching). MeanFlow "
                               "and MF-RAE: 0.25.", 0.25)
    derivative: str = doc("How du/dt is computed: jvp (torch.func.jvp, exact) or finite-difference (central "
                          "difference of step fd_delta, as MF-RAE).", "jvp")
    fd_delta: float = doc("Finite-difference step δ (MF-RAE: 5e-3).", 5e-3)
    adaptive_p: float = doc("Adaptive loss weight w = 1/(‖Δ‖² + c)^p on the per-sample mean squared error (stop-"
                            "gradient); 0 = plain MSE, 1 = MeanFlow / MF-RAE.", 1.0)
    adaptive_c: float = doc("The c of the adaptive weight (MeanFlow: 1e-3).", 1e-3)
    guidance_scale: float = doc("ω: classifier-free guidance folded into the target velocity, "
                                "ṽ = ω·v + κ·u(z,t,t|y) + (1 − ω − κ)·u(z,t,t|∅) (the model's own r = t "
                                "predictions; with a teacher: the teacher's guided velocity). 1 = no guidance. A "
                                "guided 1-step sample then costs one network evaluation.", 1.0)
    guidance_kappa: float = doc("κ of the guided target (MeanFlow's improved CFG); ignored with a teacher.", 0.0)
    guidance_t_min: float = doc("Fold guidance only where t_min ≤ t ≤ t_max (elsewhere ṽ = the unguided velocity).",
                                0.0)
    guidance_t_max: float = doc("Upper end of the guidance interval.", 1.0)
    init: Optional[str] = doc("Initial weights (a fresh run only; resume ignores it): teacher (the teacher's EMA "
                              "weights when a teacher is set, else random), a train-dit run / checkpoint folder "
                              "(flow or MeanFlow; a flow checkpoint gets a zero-output r_embedder, so it starts as "
                              "the flow model), or null (random).", "teacher")
    consistency_ode_steps: int = doc("stage consistency: Euler steps of the teacher trajectory (MF-RAE CMT: 16).",
                                     16)

    def validate(self) -> None:
        if self.stage not in STAGES:
            raise ConfigError(f"meanflow.stage must be one of {', '.join(STAGES)}, not {self.stage!r}")
        if self.derivative not in DERIVATIVES:
            raise ConfigError(f"meanflow.derivative must be one of {', '.join(DERIVATIVES)}, not "
                              f"{self.derivative!r}")
        if not 0.0 <= self.ratio_r_neq_t <= 1.0:
            raise ConfigError("meanflow.ratio_r_neq_t must be in [0, 1]")
        if self.fd_delta <= 0 or self.adaptive_c <= 0 or self.adaptive_p < 0:
            raise ConfigError("meanflow.fd_delta and adaptive_c must be > 0, adaptive_p ≥ 0")
        if self.guidance_scale < 0 or not 0.0 <= self.guidance_t_min <= self.guidance_t_max <= 1.0:
            raise ConfigError("meanflow needs guidance_scale ≥ 0 and 0 ≤ guidance_t_min ≤ guidance_t_max ≤ 1")
        if self.consistency_ode_steps < 1:
            raise ConfigError("meanflow.consistency_ode_steps must be ≥ 1")

    @property
    def guided(self) -> bool:
        return self.guidance_scale != 1.0 or self.guidance_kappa != 0.0


# ------------------------------------------------------------------------------------------------- (r, t) sampler


def sample_rt(n: int, *, ratio_r_neq_t: float, kind: str = "logit-normal", mu: float = 0.0, sigma: float = 1.0,
              t0: float = 0.0, t1: float = 0.999, shift: float = 1.0,
              generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(r, t), each (n,) fp32 with r ≤ t: two draws from the flow's (shifted) time distribution, sorted; then
    r = t for a share 1 − ratio_r_neq_t of the samples (MeanFlow's sampler, as MF-RAE ``sample_mf``)."""
    from rae_cli.flow import sample_time

    a = sample_time(n, kind, mu=mu, sigma=sigma, t0=t0, t1=t1, shift=shift, generator=generator)
    b = sample_time(n, kind, mu=mu, sigma=sigma, t0=t0, t1=t1, shift=shift, generator=generator)
    equal = torch.rand(n, generator=generator) >= ratio_r_neq_t
    r, t = torch.minimum(a, b), torch.maximum(a, b)
    return torch.where(equal, t, r), t


def draw_times(cfg: MeanFlowConfig, flow, seed: int, step: int, global_batch: int,
               shift: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(r, t) of every sample of the global batch of ``step``, from (seed, step) alone (any split, any resume)."""
    from rae_cli.distributed import generator

    return sample_rt(global_batch, ratio_r_neq_t=cfg.ratio_r_neq_t, kind=flow.time_dist, mu=flow.logit_mu,
                     sigma=flow.logit_sigma, t0=flow.t0, t1=flow.t1, shift=shift,
                     generator=generator(seed, SEED_MEANFLOW, step))


# ------------------------------------------------------------------------------------------------- the loss


def _bcast(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.view(-1, *[1] * (like.dim() - 1)).to(like.dtype)


def _mask(m: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return m.view(-1, *[1] * (like.dim() - 1))


def math_attention():
    """The SDPA math kernel: the only one with forward-mode AD (needed by torch.func.jvp)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


def total_derivative(net: Callable, z: torch.Tensor, r: torch.Tensor, t: torch.Tensor, v: torch.Tensor, *,
                     method: str = "jvp", delta: float = 5e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """(u, du/dt) of ``net(z, r, t)`` along the path: du/dt = ∂_z u·v + ∂_t u (tangent (v, 0, 1) in (z, r, t)).

    ``jvp``: exact, u keeps its autograd graph (the caller may train through it). ``finite-difference``: central
    difference [u(z + δv, r, t + δ) − u(z − δv, r, t − δ)] / 2δ (no graph), u from a plain forward.
    """
    if method == "jvp":
        def fn(z_, r_, t_):
            with math_attention():
                return net(z_, r_, t_)
        return torch.func.jvp(fn, (z, r, t), (v, torch.zeros_like(r), torch.ones_like(t)))
    if method == "finite-difference":
        with torch.no_grad():
            d = torch.full_like(t, delta)
            plus = net(z + delta * v, r, t + d)
            minus = net(z - delta * v, r, t - d)
        return net(z, r, t), (plus - minus) / (2 * delta)
    raise ValueError(f"unknown derivative method {method!r}")


def adaptive_weighted(sq_err: torch.Tensor, p: float, c: float) -> torch.Tensor:
    """Per-sample sg(w)·‖Δ‖² with w = 1/(‖Δ‖² + c)^p (MeanFlow's adaptive loss; p = 0 is the plain MSE)."""
    if p == 0:
        return sq_err
    return sq_err / (sq_err.detach() + c).pow(p)


def target_velocity(net: Callable, z_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor, drop: torch.Tensor | None,
                    v: torch.Tensor, null_label: int, cfg: MeanFlowConfig) -> torch.Tensor:
    """ṽ with guidance folded in, for samples that keep their label and have t in the guidance interval:
    ω·v + κ·u(z_t, t, t | y) + (1 − ω − κ)·u(z_t, t, t | ∅), the u's from ``net(z, r, t, y)`` without gradients.
    Elsewhere ṽ = v. ``v`` is the conditional velocity ε − x."""
    if not cfg.guided:
        return v
    inside = (t >= cfg.guidance_t_min) & (t <= cfg.guidance_t_max)
    if drop is not None:
        inside &= drop == 0
    if not bool(inside.any()):
        return v
    with torch.no_grad():
        y_null = torch.full_like(y, null_label)
        both = net(torch.cat([z_t, z_t]), torch.cat([t, t]), torch.cat([t, t]), torch.cat([y, y_null])).float()
        u_cond, u_uncond = both.chunk(2)
    w, k = cfg.guidance_scale, cfg.guidance_kappa
    guided = w * v + k * u_cond + (1 - w - k) * u_uncond
    return torch.where(_mask(inside, v), guided, v)


def teacher_velocity(teacher: Callable, z_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                     drop: torch.Tensor | None, null_label: int, cfg: MeanFlowConfig) -> torch.Tensor:
    """The frozen flow teacher's velocity at (z_t, t): for samples that keep their label and lie in the guidance
    interval v_∅ + ω·(v_y − v_∅); the unconditional v_∅ for dropped labels; else the conditional v_y."""
    y_in = y if drop is None else torch.where(drop == 1, torch.full_like(y, null_label), y)
    with torch.no_grad():
        if cfg.guidance_scale == 1.0:
            return teacher(z_t, t, y_in).float()
        y_null = torch.full_like(y, null_label)
        cond, uncond = teacher(torch.cat([z_t, z_t]), torch.cat([t, t]), torch.cat([y_in, y_null])).float().chunk(2)
    inside = (t >= cfg.guidance_t_min) & (t <= cfg.guidance_t_max)
    return torch.where(_mask(inside, cond), uncond + cfg.guidance_scale * (cond - uncond), cond)


@dataclass
class MeanFlowLoss:
    """The per-micro-batch loss of ``objective: meanflow``: ``(weighted (B,), mse (B,))`` — the first is
    back-propagated, the second (the plain mean squared error to the target) is what gets logged."""

    cfg: MeanFlowConfig
    null_label: int
    teacher: Optional[torch.nn.Module] = None
    shift: float = 1.0

    def __call__(self, model_fn: Callable, raw_model: torch.nn.Module, z: torch.Tensor, y: torch.Tensor,
                 drop: torch.Tensor | None, r: torch.Tensor, t: torch.Tensor,
                 noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cfg.stage == "consistency":
            return self._consistency(model_fn, y, drop, noise, r, t)
        kw = {} if drop is None else {"force_drop_ids": drop}

        def bare(z_, r_, t_):  # the unwrapped module: JVPs and no-grad evaluations
            return raw_model(z_, t_, y, r=r_, **kw)

        z_t = (1 - _bcast(t, z)) * z + _bcast(t, z) * noise
        if self.teacher is not None:
            v = teacher_velocity(self.teacher, z_t, t, y, drop, self.null_label, self.cfg)
        else:
            def labelled(z_, r_, t_, y_):  # explicit labels (null included), never the random training dropout
                return raw_model(z_, t_, y_, r=r_, force_drop_ids=torch.zeros_like(y_))

            v = target_velocity(labelled, z_t, t, y, drop, noise - z, self.null_label, self.cfg)
        v = v.to(z_t.dtype)
        one_pass = model_fn is raw_model and self.cfg.derivative == "jvp" and not raw_model.grad_checkpointing
        if one_pass:
            u, dudt = total_derivative(bare, z_t, r, t, v, method="jvp")
        else:
            with torch.no_grad():
                _, dudt = total_derivative(bare, z_t, r, t, v, method=self.cfg.derivative, delta=self.cfg.fd_delta)
            u = model_fn(z_t, t, y, r=r, **kw)
        target = (v - _bcast(t - r, v) * dudt).detach()
        sq = ((u.float() - target.float()) ** 2).flatten(1).mean(dim=1)
        return adaptive_weighted(sq, self.cfg.adaptive_p, self.cfg.adaptive_c), sq.detach()

    def _consistency(self, model_fn, y, drop, noise, r, t):
        """CMT (MF-RAE): Euler trajectory of the (guided) teacher from ε over the shifted grid; for every sample one
        pair of grid times τ_j < τ_i picked by (r, t) (nearest grid points), target (x_τi − x_τj)/(τi − τj)."""
        from rae_cli.samplers import time_grid

        if self.teacher is None:
            raise ConfigError("meanflow.stage=consistency needs a flow-matching teacher (teacher=RUN)")
        k = self.cfg.consistency_ode_steps
        grid = time_grid(k + 1, self.shift, to_zero=True).to(noise.device)  # k + 1 points, 1 → 0
        x, states = noise, [noise]
        for a, b in zip(grid[:-1], grid[1:]):
            tt = a.expand(len(x)).to(noise.dtype)
            x = x + (b - a) * teacher_velocity(self.teacher, x, tt, y, drop, self.null_label, self.cfg)
            states.append(x)
        traj = torch.stack(states, dim=1)  # (B, k + 1, …)
        # The drawn (r, t) pick grid points: i = the point nearest t, j = the point nearest r, forced to j > i.
        i = (grid[None, :] - t[:, None]).abs().argmin(dim=1).clamp(max=k - 1)
        j = torch.maximum((grid[None, :] - r[:, None]).abs().argmin(dim=1), i + 1)
        rows = torch.arange(len(x), device=x.device)
        x_i, x_j, t_i, t_j = traj[rows, i], traj[rows, j], grid[i], grid[j]
        target = (x_i - x_j) / _bcast(t_i - t_j, x_i)
        kw = {} if drop is None else {"force_drop_ids": drop}
        u = model_fn(x_i, t_i, y, r=t_j, **kw)
        sq = ((u.float() - target.float()) ** 2).flatten(1).mean(dim=1)
        return sq, sq.detach()


# ------------------------------------------------------------------------------------------------- teacher, init


def load_teacher(path: str, device: torch.device, latent_shape, num_classes: int) -> torch.nn.Module:
    """A frozen flow-matching model (EMA weights) from a train-dit run or checkpoint folder, checked against the
    data; it is called as ``teacher(x, t, y)``."""
    from rae_cli.stage2_loading import load_trained_dit

    model, tcfg = load_trained_dit(path, weights="ema", device=device)
    if list(tcfg.latent_shape) != [int(d) for d in latent_shape] or int(tcfg.num_classes) != int(num_classes):
        raise ConfigError(f"teacher {path} was trained on latents {tcfg.latent_shape} with {tcfg.num_classes} "
                          f"classes; this run has {list(latent_shape)} and {num_classes}")
    if getattr(model, "second_time", "none") != "none":
        log.info("teacher %s is a MeanFlow model: its r = t output (instantaneous velocity) is used", path)
    model.requires_grad_(False)
    return model


def initialise(model: torch.nn.Module, init: Optional[str], teacher_path: Optional[str]) -> Optional[str]:
    """Load the initial weights of a fresh MeanFlow run (see ``MeanFlowConfig.init``); returns the source used."""
    from rae_cli.dit import load_flow_into_meanflow
    from rae_cli.run_dir import resolve_checkpoint

    source = teacher_path if init == "teacher" else init
    if not source:
        return None
    ck = resolve_checkpoint(source)
    try:
        kept = load_flow_into_meanflow(model, ck.weights("ema"), f"EMA weights of {ck.path}")
    except ValueError as e:
        raise ConfigError(f"meanflow.init: {e}") from e
    log.info("meanflow: initialised from %s%s", ck.path, " (flow model; r_embedder starts at zero)" if kept else "")
    return str(ck.path)


# ------------------------------------------------------------------------------------------------- sampling


def meanflow_grid(num_steps: int, shift: float = 1.0) -> torch.Tensor:
    """num_steps + 1 times from 1 to exactly 0: shift(1 − k/num_steps), the jumps of the few-step sampler."""
    from rae_cli.flow import shift_time

    if num_steps < 1:
        raise ValueError(f"MeanFlow sampling needs num_steps ≥ 1, got {num_steps}")
    grid = shift_time(1 - torch.linspace(0.0, 1.0, num_steps + 1), shift)
    grid[-1] = 0.0
    return grid


def sample(net: Callable, z: torch.Tensor, *, num_steps: int, shift: float = 1.0):
    """Few-step MeanFlow sampling: z ← z − (t − r)·u(z, r, t) over :func:`meanflow_grid`; ``net(z, r, t)``.
    One network evaluation per step (num_steps = 1: the one-step map z_0 = z_1 − u(z_1, 0, 1))."""
    from rae_cli.samplers import SampleResult

    grid = meanflow_grid(num_steps, shift).to(z.device)
    x = z
    dtype = torch.float64 if z.dtype == torch.float64 else torch.float32
    for t_cur, t_next in zip(grid[:-1], grid[1:]):
        t = t_cur.to(dtype).expand(len(x)).clone()
        r = t_next.to(dtype).expand(len(x)).clone()
        x = x - (t_cur - t_next) * net(x, r, t)
    return SampleResult(x, None, num_steps)


__all__ = ["MeanFlowConfig", "MeanFlowLoss", "sample_rt", "draw_times", "total_derivative", "adaptive_weighted",
           "target_velocity", "teacher_velocity", "load_teacher", "initialise", "meanflow_grid", "sample",
           "math_attention"]


def training_objective(cfg, model: torch.nn.Module, data, shift: float, device):
    """train-dit's objective for ``cfg`` (a TrainDiTConfig): None for flow matching; for objective=meanflow, load
    the frozen teacher, put the initial weights into ``model`` (a resumed run then overwrites them from its
    checkpoint) and return the loss."""
    if cfg.objective != "meanflow":
        return None
    if cfg.meanflow.stage == "consistency" and not cfg.teacher:
        raise ConfigError("meanflow.stage=consistency needs a flow-matching teacher (teacher=RUN)")
    teacher = load_teacher(cfg.teacher, device, data.latent_shape, data.num_classes) if cfg.teacher else None
    initialise(model, cfg.meanflow.init, cfg.teacher)
    null_label = data.num_classes if cfg.dit.class_dropout_prob > 0 else -1
    if cfg.meanflow.guided and null_label < 0:
        raise ConfigError("meanflow guidance needs a model trained with label dropout (dit.class_dropout_prob > 0)")
    return MeanFlowLoss(cfg.meanflow, null_label, teacher, shift)
