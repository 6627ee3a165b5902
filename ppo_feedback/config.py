"""Configuration: one dataclass per concern, a docstring under every field.

The command line of `app.py` (and of the worker) is generated from these dataclasses, so `--help`
always lists every option with its default and its environment variable `PPO_FEEDBACK_<FIELD>`.
Nothing here imports torch, so `--help` and option errors answer at once.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import math
import os
import textwrap
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Optional, get_type_hints

ENV_PREFIX = "PPO_FEEDBACK_"


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(level: str) -> None:
    """Set up Python logging for a process of this project, in the one format all of them use."""
    import logging

    logging.basicConfig(level=level.upper(), format=LOG_FORMAT)


def default_cache_dir() -> str:
    """Return the user's cache directory for converted models (XDG_CACHE_HOME or ~/.cache)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "ppo-feedback")


DTYPES = ("auto", "float32", "bfloat16", "float16")
"""What `--dtype` accepts: auto or a torch floating dtype's name."""


@dataclass
class ModelConfig:
    model: str = "gpt2"
    """Model spec: a hub id (gpt2), a local model directory, a .gguf file, or the offline alias smollm2-135m."""
    cache_dir: str = field(default_factory=default_cache_dir)
    """Where GGUF models are cached after their one-time de-quantisation to safetensors."""
    device: str = "auto"
    """Device for the model: auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps."""
    quantize: Optional[str] = None
    """Load the base model in 4bit or 8bit through bitsandbytes (CUDA only); empty for full precision."""
    hub_timeout: float = 3.0
    """Seconds to wait for the model hub before falling back to offline models."""
    dtype: str = "auto"
    """Precision of the frozen base weights: auto (bfloat16 on a CUDA GPU that has it and on a CPU with native bfloat16, flag avx512_bf16 or amx_bf16 in /proc/cpuinfo; else float32), float32, bfloat16 or float16; LoRA, value head and log-probabilities stay float32."""

    def validate(self) -> None:
        """Raise ValueError on an impossible setting."""
        if self.quantize not in (None, "", "4bit", "8bit"):
            raise ValueError(f"--quantize must be 4bit or 8bit, not {self.quantize!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be auto, float32, bfloat16 or float16, not {self.dtype!r}")
        if not (self.device == "auto" or self.device in ("cpu", "mps") or self.device.startswith("cuda")):
            raise ValueError(f"--device must be auto, cpu, cuda, cuda:N or mps, not {self.device!r}")


@dataclass
class LoraSettings:
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: int = 32
    """LoRA scaling numerator (scale = alpha / r)."""
    lora_dropout: float = 0.0
    """LoRA dropout; PPO runs every forward in eval mode, so this only matters for other trainers."""
    lora_target_modules: Optional[str] = None
    """Comma-separated module names to adapt; empty picks peft's default for the architecture (GPT-2 c_attn, Llama q_proj,v_proj)."""

    def validate(self) -> None:
        """Raise ValueError on an impossible setting."""
        if self.lora_r < 1 or self.lora_alpha <= 0:
            raise ValueError("--lora-r must be >= 1 and --lora-alpha > 0")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError("--lora-dropout must be in [0, 1)")


@dataclass
class SamplingConfig:
    num_candidates: int = 4
    """Candidates generated per prompt for raters to compare."""
    max_new_tokens: int = 48
    """Most tokens sampled per candidate."""
    temperature: float = 1.0
    """Sampling temperature; PPO computes log-probabilities at the same temperature."""
    top_p: float = 1.0
    """Nucleus sampling threshold (1.0 samples from the whole tempered distribution)."""
    max_prompt_chars: int = 2000
    """Longest prompt accepted, in characters."""
    max_candidates: int = 8
    """Most candidates one request may ask for."""

    def validate(self) -> None:
        """Raise ValueError on an impossible setting."""
        if self.temperature <= 0:
            raise ValueError("--temperature must be > 0")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError("--top-p must be in (0, 1]")
        if self.max_new_tokens < 1 or self.num_candidates < 1 or self.max_candidates < self.num_candidates:
            raise ValueError("--max-new-tokens and --num-candidates must be >= 1, and <= --max-candidates")


@dataclass
class AppConfig:
    host: str = "127.0.0.1"
    """Address the web page binds to."""
    port: int = 7860
    """Port of the web page."""
    db: str = "data/feedback.db"
    """SQLite file or any SQLAlchemy URL (postgresql+psycopg://...) holding prompts, ratings and versions."""
    adapters_dir: str = "adapters"
    """Directory of published adapter versions (v0001/, v0002/, ...), shared with the worker."""
    log_level: str = "INFO"
    """Python logging level."""
    auth_file: Optional[str] = None
    """JSON users file (hashed passwords, admin flags; see `python -m ppo_feedback.auth`); turns on the login page."""
    insecure_no_auth: bool = False
    """Allow binding --host to a non-loopback address without --auth-file (anyone who can reach the port can rate and operate)."""
    worker: bool = True
    """Start the training worker (`python -m ppo_feedback.worker`) as a child process; --no-worker when it runs elsewhere."""
    poll_interval: float = 2.0
    """Seconds between the page's checks for a newly published adapter version to serve."""
    overlap: float = 0.0
    """Fraction (0..1) of pages offered to a second rater: a page another rater judged, the same generations, so raters' agreement can be measured (/agreement)."""
    serving_weights: str = "same"
    """The page's copy of the base for decoding: same (as --dtype loads it) or int8 (the frozen linear layers in torch's dynamic int8, CPU only: a quarter of float32's bytes read per decode step; LoRA, embeddings and the worker's training stay as loaded)."""
    share: bool = False
    """Open a public Gradio link (a gradio.live tunnel) to the page; needs --auth-file. GRADIO_SHARE=true asks for the same and is refused without logins too."""
    max_upload_mb: float = 10.0
    """Largest file the page accepts as an upload (prompt files), in MiB; larger ones are refused (HTTP 413)."""
    login_max_failures: int = 5
    """Failed logins per user name within --login-window seconds (four times as many per client address) after which further logins, even the right one, are refused with HTTP 429 until the window has passed."""
    login_window: float = 300.0
    """Seconds over which failed logins are counted (see --login-max-failures)."""
    mix_versions: bool = False
    """Mix each page (of two or more candidates) from the serving version and the one it replaced (half each, shuffled, blind): the raters' picks give the new version's win rate in Progress. A second decode batch per page: about twice the page's decode time."""

    queue_size: int = 64
    """Most requests the page's queue holds at once (Gradio's max_size); more are refused with "the queue is full"."""
    generations_per_user: int = 2
    """With logins, most model calls (/generate, /generate_stream, Generate, Compare) one user may have waiting or running at once; more are refused with a clear message."""

    def validate(self) -> None:
        """Raise ValueError on an impossible or unsafe setting."""
        if self.queue_size < 1 or self.generations_per_user < 1:
            raise ValueError("--queue-size and --generations-per-user must be at least 1")
        if not 0 < self.port < 65536:
            raise ValueError(f"--port must be in 1..65535, not {self.port}")
        if not 0.0 <= self.overlap <= 1.0:
            raise ValueError(f"--overlap must be in 0..1, not {self.overlap}")
        if self.poll_interval <= 0:
            raise ValueError("--poll-interval must be > 0")
        if self.serving_weights not in ("same", "int8"):
            raise ValueError(f"--serving-weights must be same or int8, not {self.serving_weights!r}")
        if not self.auth_file and not self.insecure_no_auth and not is_loopback(self.host):
            raise ValueError(f"--host {self.host} would let anyone on the network rate and operate without a "
                             "login: give --auth-file users.json, or --insecure-no-auth if that is really meant")
        if not self.auth_file and self.public_link():
            raise ValueError("--share (or GRADIO_SHARE=true) would open a public link through which anyone on the "
                             "internet could rate and operate without a login: give --auth-file users.json")
        if self.max_upload_mb <= 0:
            raise ValueError(f"--max-upload-mb must be > 0, not {self.max_upload_mb}")
        if self.login_max_failures < 1 or self.login_window <= 0:
            raise ValueError("--login-max-failures must be >= 1 and --login-window > 0")

    def public_link(self) -> bool:
        """Return whether a public Gradio link is asked for: --share, or Gradio's own GRADIO_SHARE=true."""
        return self.share or os.environ.get("GRADIO_SHARE", "").strip().lower() == "true"


def is_loopback(host: str) -> bool:
    """Return whether `host` names this machine only (localhost, 127.0.0.0/8, ::1)."""
    import ipaddress

    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False


def _type_of(hint: Any) -> type:
    """Return the concrete scalar type behind an Optional[...] hint."""
    args = getattr(hint, "__args__", None)
    if args:
        return next(a for a in args if a is not type(None))
    return hint


@lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """Return {field name: the docstring written under it} for a dataclass, read from its source."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) \
                and isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def env_name(field_name: str) -> str:
    """Return the environment variable that sets a field: PPO_FEEDBACK_<FIELD>."""
    return ENV_PREFIX + field_name.upper()


def _or_none(kind: type):
    """Return a parser of `kind` that reads "none" (any case) or "" as None: how an optional option that has
    a default is unset on the command line (`--direct-max-steps none`)."""
    def parse(text: str):
        return None if text.strip().lower() in ("", "none") else kind(text)
    parse.__name__ = kind.__name__  # argparse names the type in its errors
    return parse


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def option_fields(cls: type) -> list[tuple[dataclasses.Field, type]]:
    """Return (field, scalar type) for every field of dataclass `cls` that is a command-line option.

    A field holding another dataclass (`PPOConfig.sampling`) is no option: whoever builds the
    config composes it from other options.
    """
    hints = get_type_hints(cls)
    fields = ((f, _type_of(hints[f.name])) for f in dataclasses.fields(cls))
    return [(f, kind) for f, kind in fields if not dataclasses.is_dataclass(kind)]


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type, title: str | None = None) -> None:
    """Add one --option per option field of `cls`; defaults come from PPO_FEEDBACK_<FIELD> when set."""
    group = parser.add_argument_group(title or cls.__name__)
    docs = field_docs(cls)
    hints = get_type_hints(cls)
    for f, kind in option_fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        optional = type(None) in getattr(hints[f.name], "__args__", ())
        env = os.environ.get(env_name(f.name))
        if env is not None:
            default = _parse_bool(env) if kind is bool else (kind(env) if env != "" else None)
        option = "--" + f.name.replace("_", "-")
        help_text = f"{docs.get(f.name, '')} (default: {default!r}; env {env_name(f.name)})".replace("%", "%%")  # argparse formats help
        if kind is bool:
            group.add_argument(option, default=default, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            group.add_argument(option, default=default, type=_or_none(kind) if optional else kind, help=help_text)


def options_markdown(sections) -> str:
    """Return a Markdown table of every option of `sections` ((dataclass, title) pairs)."""
    rows = ["| option | environment variable | default | what it sets |", "| --- | --- | --- | --- |"]
    for cls, title in sections:
        docs = field_docs(cls)
        for f, kind in option_fields(cls):
            option = f"`--{f.name.replace('_', '-')}`"
            if kind is bool:
                option += f" / `--no-{f.name.replace('_', '-')}`"
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            if f.name == "cache_dir":
                default = "~/.cache/ppo-feedback"  # the user's, not this machine's, path
            shown = "(none)" if default in (None, "") else f"`{default}`"
            what = docs.get(f.name, "").replace("|", "\\|")
            rows.append(f"| {option} | `{env_name(f.name)}` | {shown} | {title}: {what} |")
    return "\n".join(rows)


def from_namespace(cls: type, ns: argparse.Namespace, **overrides: Any) -> Any:
    """Return an instance of dataclass `cls` built from the parsed arguments that match its fields, then `overrides`."""
    values = {f.name: getattr(ns, f.name) for f in dataclasses.fields(cls) if hasattr(ns, f.name)}
    instance = cls(**{**values, **overrides})
    if hasattr(instance, "validate"):
        instance.validate()
    return instance


# ------------------------------------------------------------------ training: PPO, reward model, worker

@dataclass
class RolloutSampling:
    """How PPO samples its responses; the worker takes them from the page's `SamplingConfig`."""

    max_new_tokens: int = 32
    """Most tokens sampled per response."""
    temperature: float = 1.0
    """Sampling temperature, also used for every PPO log-probability."""
    top_p: float = 1.0
    """Nucleus sampling threshold."""
    stop_at_eos: bool = True
    """Stop responses at EOS; off gives fixed-length responses (the benchmark's work)."""

    @classmethod
    def from_page(cls, sampling: SamplingConfig) -> RolloutSampling:
        """Return rollout settings that sample as the page does: its length, temperature and top-p; stop at EOS."""
        return cls(max_new_tokens=sampling.max_new_tokens, temperature=sampling.temperature, top_p=sampling.top_p)

    def validate(self) -> None:
        """Raise ValueError on an impossible setting."""
        if self.temperature <= 0 or not 0 < self.top_p <= 1 or self.max_new_tokens < 1:
            raise ValueError("temperature > 0, 0 < top_p <= 1 and max_new_tokens >= 1 are required")


@dataclass
class PPOConfig:
    batch_size: int = 8
    """Prompts per PPO iteration (one sampled response each)."""
    mini_batch_size: int = 8
    """Responses per gradient step; batch_size must be a multiple of it."""
    ppo_epochs: int = 2
    """Passes over the batch per iteration."""
    learning_rate: float = 1e-3
    """Adam learning rate for the LoRA weights and value head (the default is the one measured to learn from a few hundred ratings; see README)."""
    max_grad_norm: float = 1.0
    """Global gradient-norm clip."""
    gamma: float = 1.0
    """Discount factor."""
    lam: float = 0.95
    """GAE lambda."""
    cliprange: float = 0.2
    """PPO ratio clip epsilon."""
    cliprange_value: float = 0.2
    """Value clip epsilon around the rollout's values."""
    vf_coef: float = 0.1
    """Weight of the value loss in the total loss."""
    kl_estimator: str = "k1"
    """Per-token KL estimator in the reward: k1 or k3."""
    adaptive_kl: bool = True
    """Adapt the KL coefficient towards target_kl (Ziegler); otherwise keep init_kl_coef fixed."""
    init_kl_coef: float = 0.1
    """Initial KL penalty coefficient beta."""
    target_kl: float = 6.0
    """Adaptive controller's target KL per sequence, in nats."""
    kl_horizon: int = 100
    """Adaptive controller's horizon, in samples (Ziegler et al. used 10000 for batches of hundreds; a few hundred ratings give tens of iterations)."""
    whiten_rewards: bool = False
    """Whiten per-token rewards (without shifting the mean) before GAE."""
    missing_eos_penalty: Optional[float] = None
    """Subtracted from the score of responses that hit the length limit without EOS."""
    sampling: RolloutSampling = field(default_factory=RolloutSampling)
    """How rollouts are sampled (composed by the worker from the page's sampling options)."""
    seed: int = 0
    """Seed for sampling and minibatch shuffling."""

    def validate(self) -> None:
        """Raise ValueError on an inconsistent setting."""
        if self.batch_size < 1 or self.mini_batch_size < 1 or self.batch_size % self.mini_batch_size:
            raise ValueError("batch_size must be a positive multiple of mini_batch_size")
        from .ppo import KL_ESTIMATORS  # the maths owns the estimators; imported here, config stays torch-free

        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}")
        self.sampling.validate()
        if self.learning_rate <= 0 or self.ppo_epochs < 1:
            raise ValueError("learning_rate > 0 and ppo_epochs >= 1 are required")


@dataclass
class RewardConfig:
    prior_weight: float = 5.0
    """Pseudo-ratings at the global mean and spread added to each rater's own when scores are normalised per rater (k in `normalize_ratings`)."""
    reward_l2: Optional[float] = None
    """L2 penalty (ridge strength) of the reward model's linear head on standardised features; unset, each fit chooses it from 0.1, 1, 10, 100 by 5-fold cross-validation over prompts (10 with fewer than 10 prompts)."""
    preference_weight: float = 1.0
    """Weight of the Bradley-Terry preference loss relative to the score regression loss."""
    reward_holdout: float = 0.2
    """Share of prompts whose feedback is held out to measure the reward model's fit; it then refits on all data."""
    reward_max_iter: int = 50
    """Most Newton iterations per reward-model fit (full batch; it usually converges in under 10)."""
    feature_batch_size: int = 16
    """Samples per reference forward when computing reward-model features."""

    def validate(self) -> None:
        """Raise ValueError on an impossible setting."""
        if self.prior_weight < 0 or self.preference_weight < 0 or (self.reward_l2 is not None and self.reward_l2 < 0):
            raise ValueError("--prior-weight, --reward-l2 and --preference-weight must be >= 0")
        if not 0.0 <= self.reward_holdout < 1.0:
            raise ValueError("--reward-holdout must be in [0, 1)")
        if self.reward_max_iter < 1 or self.feature_batch_size < 1:
            raise ValueError("--reward-max-iter and --feature-batch-size must be >= 1")


@dataclass
class WorkerConfig:
    min_new_feedback: int = 40
    """New ratings plus preferences since the serving version needed to start a training round."""
    min_ratings: int = 16
    """Ratings in the store before any round trains (the first round waits for them), on at least --min-rated-prompts prompts."""
    min_rated_prompts: int = 3
    """Distinct prompts with ratings before any round trains: a reward model or a policy fitted to one prompt's ratings learns that prompt."""
    ppo_iterations: int = 4
    """PPO iterations per round (each round publishes one adapter version)."""
    max_kl: float = 50.0
    """Hard limit on the mean KL to the base model (nats per response); a round beyond it is discarded."""
    max_perplexity_ratio: Optional[float] = 1.2
    """A trained version is published only if the base model finds its text at most this many times as perplexing as its own text for the same prompts (exp of the base's expected surprisal per token of the version's next tokens over its fresh samples of --fluency-samples pool prompts, less the base's own rate for each prompt from its own samples: ppo_feedback.fluency); a version beyond it is searched back toward the version the round trained from (half, then a quarter of the way from that version's weights to the trained ones, on the same samples' prompts and seed: TRPO's backtracking line search; a refit from the base too searches back toward that version, not the base) and the first within it published; when none is, the round is discarded, recorded as a failed version, and the next one waits for --min-new-feedback more ratings or preferences; none: no gate."""
    fluency_samples: int = 32
    """Fresh samples (one per pool prompt drawn) on which --max-perplexity-ratio measures a trained version."""
    lease_ttl: float = 60.0
    """Seconds the training lease lasts without a heartbeat; another worker takes over after that."""
    wait_interval: float = 2.0
    """Seconds between checks for new feedback or a free lease."""
    reference_samples: int = 8
    """Base-model samples that calibrate the reward model to mean 0, std 1."""
    replay_samples: int = 16
    """Rated generations replayed in each PPO iteration beside the fresh samples (0: none): those rated above the candidates shown with them, scored by that difference."""
    worker_id: str = ""
    """Name of this worker in the lease (default host:pid)."""
    tensorboard: Optional[str] = None
    """Also write every PPO iteration's metrics to this TensorBoard log directory."""
    worker_nice: int = 10
    """Niceness the worker adds to its own process at start (os.nice), so that pages being generated on the same machine get the CPU first; 0 keeps the priority it was started with."""
    keep_versions: int = 20
    """Adapter versions whose files are kept (0: all): after each publish the worker removes the files of all but the newest N, keeping the serving version and exported ones too; a pruned version's ratings and metrics stay, but it can no longer be rolled back to."""

    def validate(self) -> None:
        """Raise ValueError on an impossible setting."""
        if self.min_new_feedback < 1 or self.ppo_iterations < 1 or self.reference_samples < 2:
            raise ValueError("--min-new-feedback, --ppo-iterations >= 1 and --reference-samples >= 2 are required")
        if self.min_ratings < 0 or self.min_rated_prompts < 0:
            raise ValueError("--min-ratings and --min-rated-prompts must be >= 0")
        if self.replay_samples < 0:
            raise ValueError("--replay-samples must be >= 0")
        if self.lease_ttl <= 0 or self.wait_interval <= 0 or self.max_kl <= 0:
            raise ValueError("--lease-ttl, --wait-interval and --max-kl must be > 0")
        if self.max_perplexity_ratio is not None and not 0 < self.max_perplexity_ratio < math.inf:
            raise ValueError(f"--max-perplexity-ratio must be a finite number > 0 (unset: no gate), "
                             f"not {self.max_perplexity_ratio}")
        if self.fluency_samples < 1:
            raise ValueError(f"--fluency-samples must be >= 1, not {self.fluency_samples}")
        if self.keep_versions < 0:
            raise ValueError(f"--keep-versions must be >= 0 (0: keep all), not {self.keep_versions}")
        if not 0 <= self.worker_nice <= 19:
            raise ValueError(f"--worker-nice must be in 0..19 (0: no change), not {self.worker_nice}")


OBJECTIVES = ("ppo", "dpo", "ipo", "raft", "kto")
FALLBACKS = ("dpo", "ipo", "raft", "kto", "wait", "ppo")
"""What `--objective` accepts: PPO on a fitted reward model, or a direct objective (`ppo_feedback.direct`)."""


@dataclass
class ObjectiveConfig:
    objective: str = "dpo"
    """What a round trains: ppo (reward model, PPO iterations, replay), or directly from the rated pages: dpo (pairs of one page's candidates rated differently with a good chosen one, and picks), ipo (the same pairs, IPO's squared loss), raft (likelihood of good candidates rated above their page's mean) or kto (good candidates and those rated below their rater's mean); a direct round runs --direct-epochs passes of --direct-batch-size minibatches at --learning-rate."""
    beta: float = 0.25
    """DPO's and KTO's beta, IPO's tau (its per-token margin target is 1/(2 tau)): the strength of their implicit KL bound to the base model (also scales the rewards/* statistics of every direct objective)."""
    rpo_alpha: float = 1.0
    """DPO's (and IPO's) added weight on the chosen responses' negative log-likelihood per token (RPO, Pang et al. 2024; 1.0 in the paper; 0: plain DPO): keeps what the raters chose likely, so DPO does not drift onto text neither candidate resembles."""
    direct_epochs: int = 4
    """Passes over all of a direct round's examples (every rated page so far), in shuffled minibatches (a page's examples together)."""
    direct_batch_size: int = 8
    """Examples per optimizer step of a direct round (DPO: pairs; RAFT: kept candidates; KTO: labelled candidates)."""
    direct_target_kl: Optional[float] = 8.0
    """A direct round stops its passes early once fresh samples' KL to the base model exceeds this, in nats per response (measured after the last optimizer step, and during the round after 4 steps, then where the KL's growth so far would reach the target, at most 8 steps apart; CleanRL's target_kl early stop); none: every pass runs."""
    direct_max_perplexity_ratio: Optional[float] = 1.1
    """A direct round also stops its passes early once the base model's perplexity of fresh samples' tokens exceeds this multiple of what it expects at the same contexts (exp of its mean surprisal per token less its entropy there; measured with the KL, every 4 steps without --direct-target-kl): a bound on fluency, which the KL alone does not give (a policy sharpening onto the base's likely tokens moves far in KL and stays fluent, one spreading onto unlikely ones loses fluency at a lower KL); recorded as objective/perplexity_ratio either way; none: no bound."""
    direct_max_steps: Optional[int] = 24
    """At most this many optimizer steps a direct round (its passes stop there): a round's cost stays bounded as the rated pages grow, so rounds keep pace with the raters; none: no budget."""
    direct_from_base: bool = True
    """Each direct round trains a fresh adapter from the base model on all rated pages so far (a new optimizer too), instead of continuing from the version it loaded: the newest version is then one fit of the whole feedback, not the sum of every round's passes over the early pages. With --direct-max-steps, only while two passes over every example (one with --direct-epochs 1) fit that budget: once the pages outgrow it a round continues from the version it loaded (shrunk by --direct-shrink), since a refit cut to under two passes barely moves the model (PPO's reward-model fallback rounds always continue)."""
    direct_shrink: float = 0.5
    """A direct round that continues from the version it loaded first scales that adapter's change to the base by this factor (every LoRA B; shrink-and-perturb without the perturbation, Ash & Adams 2020): what earlier rounds learned fades by it each round, so a round has KL room under --direct-target-kl for the pages rated since, where a continued adapter otherwise only adds to its drift; 1: off (no effect on rounds that refit from the base, --direct-from-base)."""
    good_score: float = 1.0
    """Normalised score (a rater's own standard deviations above their own mean) from which a rated candidate counts as good; what a direct objective makes likelier must be good: RAFT keeps good candidates above their page's mean, DPO's pairs from ratings need a good chosen one (picks always count), KTO's desirable ones are good (-inf: every candidate above its page's mean, or above its rater's mean for KTO)."""
    reward_model_fallback: str = "raft"
    """What a ppo round trains when its reward model does not order held-out pages better than chance (the 95% interval of its agreement with the raters must lie above 0.5, judged on at least 10 pages): dpo, ipo, raft or kto on the rated pages, wait (publish nothing until more feedback comes), or ppo (optimise it anyway: for experiments)."""

    @property
    def direct(self) -> bool:
        """Whether rounds train a direct objective instead of PPO."""
        return self.objective != "ppo"

    def validate(self) -> None:
        """Raise ValueError on an unknown objective or a beta that is not a finite number > 0."""
        if self.objective not in OBJECTIVES:
            raise ValueError(f"--objective must be one of {', '.join(OBJECTIVES)}, not {self.objective!r}")
        if self.reward_model_fallback not in FALLBACKS:
            raise ValueError(f"--reward-model-fallback must be one of {', '.join(FALLBACKS)}, "
                             f"not {self.reward_model_fallback!r}")
        if self.direct_target_kl is not None and not 0 < self.direct_target_kl < math.inf:
            raise ValueError(f"--direct-target-kl must be a finite number > 0 (unset: no early stop), "
                             f"not {self.direct_target_kl}")
        if self.direct_max_perplexity_ratio is not None and not 0 < self.direct_max_perplexity_ratio < math.inf:
            raise ValueError(f"--direct-max-perplexity-ratio must be a finite number > 0 (unset: no bound), "
                             f"not {self.direct_max_perplexity_ratio}")
        if self.direct_epochs < 1 or self.direct_batch_size < 1:
            raise ValueError("--direct-epochs and --direct-batch-size must be >= 1")
        if not 0 < self.direct_shrink <= 1:
            raise ValueError(f"--direct-shrink must be in (0, 1], not {self.direct_shrink}")
        if self.direct_max_steps is not None and self.direct_max_steps < 1:
            raise ValueError(f"--direct-max-steps must be >= 1, not {self.direct_max_steps}")
        if math.isnan(self.good_score) or self.good_score == math.inf:
            raise ValueError(f"--good-score must be a number or -inf, not {self.good_score}")
        if not (0 <= self.rpo_alpha < float("inf")):
            raise ValueError(f"--rpo-alpha must be a finite number >= 0, not {self.rpo_alpha}")
        if not (0 < self.beta < float("inf")):
            raise ValueError(f"--beta must be a finite number > 0, not {self.beta}")


# (dataclass, title) of the worker's own options
WORKER_SECTIONS = ((PPOConfig, "PPO"), (RewardConfig, "reward model"), (WorkerConfig, "worker"),
                   (ObjectiveConfig, "objective"))


def add_worker_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the worker's own options (PPO, reward model and round settings) to a parser; app.py shares them."""
    for cls, title in WORKER_SECTIONS:
        add_dataclass_arguments(parser, cls, title)
