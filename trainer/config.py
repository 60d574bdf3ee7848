"""The training configuration tree: frozen typed dataclasses, strict YAML loading, dotted overrides.

`model` nests the library's own dataclasses (pccnet.config), so a network option is declared and
checked in one place. An unknown key or a value of the wrong type is a ConfigError naming its dotted
path. Each component receives only its own slice; tools derive changed configs with
`dataclasses.replace`. Configs of the flat `model:` schema (before issue 11) load through `upgrade_legacy`.
Imports only pccnet and its own typed-YAML helper (trainer.typed_config), never the rest of the app.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pccnet.color import NUM_BINS
from pccnet.config import DiscriminatorConfig, ExtractorConfig, GeneratorConfig, SamplerConfig
from trainer.typed_config import ConfigError, auto_or, choice, flatten, from_dict, positive
from trainer.typed_config import to_dict as config_to_dict

__all__ = ["ConfigError", "TrainConfig", "apply_override", "config_from_dict", "config_to_dict", "flatten",
           "load_config", "load_saved_config", "resume_differences", "retrieval_with", "save_config"]

log = logging.getLogger(__name__)


class _Section:
    """A top-level section: validated on construction, so `dataclasses.replace` re-checks it too."""

    SECTION = ""

    def __post_init__(self) -> None:
        self.validate(self.SECTION)

    def validate(self, path: str) -> None:
        raise NotImplementedError


@dataclass(frozen=True)
class RunConfig(_Section):
    SECTION = "run"
    out_dir: str = "runs/default"
    seed: int = 0
    log_every: int = 10  # steps between status lines / stats.jsonl rows
    checkpoint_every: int = 500  # steps (global, phase 1 and 2 counted together)
    sample_every: int = 500  # steps between PNG sample grids
    keep_checkpoints: int = 3  # newest N kept; 0 keeps all
    mixed_precision: str = "no"  # "no" | "bf16" (autocast for G/D forwards; losses stay fp32)
    collective_timeout_s: int = 600
    # Ranks compare a parameter fingerprint at every checkpoint; with this also at every log line.
    check_ddp_every_log: bool = False

    def validate(self, path: str) -> None:
        positive(self, path, "log_every", "checkpoint_every", "sample_every", "collective_timeout_s")
        if self.keep_checkpoints < 0:
            raise ConfigError(f"{path}.keep_checkpoints must be >= 0, got {self.keep_checkpoints}")
        choice(self, path, "mixed_precision", ("no", "bf16"))


@dataclass(frozen=True)
class DataConfig(_Section):
    SECTION = "data"
    train: str = ""  # shard pattern: path, glob-free brace pattern, or pipe: URL
    val: str | None = None
    image_size: int = 256
    batch_size: int = 4  # per process
    workers: int = 2  # loader worker processes per rank
    flip: bool = True  # random horizontal flip in training
    background: str = "white"  # RGBA compositing: "white", "black" or "#rrggbb"
    shuffle_buffer: int = 256
    cache_mb: int = 256  # per training worker: decoded pixels + colour features kept for later epochs

    def validate(self, path: str) -> None:
        positive(self, path, "image_size", "batch_size", "shuffle_buffer")
        if self.workers < 0:
            raise ConfigError(f"{path}.workers must be >= 0, got {self.workers}")
        if self.cache_mb < 0:
            raise ConfigError(f"{path}.cache_mb must be >= 0, got {self.cache_mb}")
        if self.image_size % 4:
            raise ConfigError(f"{path}.image_size must be a multiple of 4, got {self.image_size}")


@dataclass(frozen=True)
class ModelConfig(_Section):
    """The networks' own configs (pccnet.config, validated there) plus what G is fed."""

    SECTION = "model"
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    extractor: ExtractorConfig = field(default_factory=ExtractorConfig)
    use_memory: bool = True  # False: the "without M" ablation (constant uniform colour feature)

    def validate(self, path: str) -> None:
        for name in ("generator", "discriminator"):
            if getattr(self, name).color_dim != NUM_BINS:
                raise ConfigError(f"{path}.{name}.color_dim must be {NUM_BINS} (the colour feature's length), "
                                  f"got {getattr(self, name).color_dim}")


@dataclass(frozen=True)
class LossConfig(_Section):
    SECTION = "loss"
    pc: float = 1.0  # lambda_1, patch-wise contrastive
    ic: float = 1.0  # lambda_2, intra-image correlation
    # lambda_3, Huber on ab/110. 100 (pix2pix's L1 weight), not METHOD.md's first guess of 10: measured on
    # Pokemon at 64 px, with 10 the generator learned to ignore the colour feature (outputs moved < 0.1
    # ab units when c came from another image); with 100 they move 4 units and the true c lowers the error.
    smooth: float = 100.0
    adv: float = 1.0  # lambda_4, LSGAN
    tau: float = 0.07
    beta: float = 1.0
    delta: float = 1.0  # Huber delta
    circle_gamma: float = 256.0
    circle_margin: float = 0.25

    def validate(self, path: str) -> None:
        for name in ("pc", "ic", "smooth", "adv", "beta"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{path}.{name} must be >= 0, got {getattr(self, name)}")
        positive(self, path, "tau", "delta", "circle_gamma")

    @property
    def needs_patches(self) -> bool:
        """Whether a patch loss is on (else the patch sampler is left out entirely)."""
        return self.pc > 0 or self.ic > 0


@dataclass(frozen=True)
class Phase1Config(_Section):
    SECTION = "phase1"
    steps: int = 1000
    lr: float = 1e-4
    k: int = 256  # top-k neighbours for the circle loss (capped at the memory's capacity)
    # delta_1, KL threshold in nats for positives and hits, or "auto": calibrated on the training data when
    # the run starts (the 15 % rule of launch/calibrate_threshold.py; trainer.calibrate), logged, and
    # stored in the checkpoint's config. The default, so that new data gets a working memory: a fixed
    # 1.5 on Pokemon makes 54 % of pairs positive and the memory collapses.
    threshold: float | str = "auto"
    age_noise: float = 4.0
    val_every: int = 0  # steps between retrieval evaluations on data.val; 0: only at the end
    # The stopping rule: after this many evaluations without a lower val/retrieval_js (the configured
    # retrieval's Jensen-Shannon to each val image's own colours), phase 1 ends early and the extractor
    # and memory of the best evaluation are restored. 0: off. Needs data.val and val_every. Rank 0 holds
    # a copy of the best evaluation's memory in RAM (about capacity x (key_dim + value_dim) x 4 bytes).
    patience: int = 0
    backbone_lr_scale: float = 0.1  # lr of model.extractor.train_convs' convs = lr * this
    # Weight of the neighbour-mix loss (pccnet.losses.neighbour_mix_loss, not in the paper) added to the
    # circle loss: the softmax(sims / mix_temperature)-weighted KL of the top-k values to the image's own.
    # 0: the paper's phase 1.
    mix_weight: float = 0.0
    mix_temperature: float = 0.1
    # After phase 1, write every training image once with the final extractor: keys written during
    # training came from earlier extractor states and drift away from test-time queries.
    reindex: bool = False
    # The keys an update writes: "post_step" recomputes the extractor after the optimizer step (a second
    # forward); "pre_step" reuses the step's own queries (MemoPainter's choice). docs/PERFORMANCE.md.
    update_query: str = "post_step"

    def validate(self, path: str) -> None:
        if self.steps < 0:
            raise ConfigError(f"{path}.steps must be >= 0, got {self.steps}")
        positive(self, path, "lr", "k")
        choice(self, path, "update_query", ("post_step", "pre_step"))
        if self.mix_weight < 0 or self.mix_temperature <= 0:
            raise ConfigError(f"{path}: mix_weight must be >= 0 and mix_temperature > 0, got {self.mix_weight} "
                              f"and {self.mix_temperature}")
        if self.patience < 0 or self.backbone_lr_scale <= 0:
            raise ConfigError(f"{path}: patience must be >= 0 and backbone_lr_scale > 0, got {self.patience} "
                              f"and {self.backbone_lr_scale}")
        if self.patience and not self.val_every:
            raise ConfigError(f"{path}.patience={self.patience} needs {path}.val_every > 0 (the evaluations it counts)")
        auto_or(self, path, "threshold", "a number of nats")
        if (not isinstance(self.threshold, str) and self.threshold < 0) or self.age_noise < 0 or self.val_every < 0:
            raise ConfigError(f"{path}: threshold, age_noise and val_every must be >= 0")

    @property
    def threshold_value(self) -> float:
        """delta_1 as a number; ConfigError while it is still 'auto' (the trainer resolves it at start-up)."""
        if isinstance(self.threshold, str):
            raise ConfigError("phase1.threshold is 'auto' and was not calibrated yet (trainer.calibrate)")
        return self.threshold


@dataclass(frozen=True)
class RetrievalConfig(_Section):
    """Test-time retrieval (trainer.retrieval): how the memory's answer for an unseen image is formed.

    k 1, flip false is the paper's: the value of the single most similar written slot. The default,
    k 16 mean with flip, was chosen on validation images of seen classes (docs/RESULTS.md, "Retrieval
    that transfers"): against top-1, LPIPS 0.229 vs 0.252, JS to the image's own 0.222 vs 0.323.
    """

    SECTION = "retrieval"
    k: int = 16  # written slots whose values are mixed
    temperature: float = 0.1  # softmax temperature over their cosine similarities (weights of the mix)
    mix: str = "mean"  # "mean": weighted mean of the histograms; "geometric": normalised weighted
    # geometric mean (keeps only colours every neighbour has); "medoid": the neighbour value with the least
    # weighted KL to the others (one real histogram, never a blend)
    flip: bool = True  # query with the mean of the features of the image and its mirror image
    anneal: float = 1.0  # in (0, 1]: sharpen the mix to p ** (1 / anneal) (1: as mixed; Zhang et al. use 0.38)

    def validate(self, path: str) -> None:
        positive(self, path, "k", "temperature", "anneal")
        if self.anneal > 1:
            raise ConfigError(f"{path}.anneal must be in (0, 1] (1 keeps the mix as it is), got {self.anneal}")
        choice(self, path, "mix", ("mean", "geometric", "medoid"))


@dataclass(frozen=True)
class Phase2Config(_Section):
    SECTION = "phase2"
    steps: int = 10000
    lr: float = 5e-4  # start of the exponential decay (METHOD.md 4: 1e-3 -> 1e-6 in the paper)
    lr_final: float = 5e-6
    betas: tuple[float, ...] = (0.5, 0.999)
    # Not in the paper: the share of training images whose colour feature is blended towards the batch's
    # mean, (1 - a) c + a mean(c) with a ~ U(0, 1), so that G learns to colour vividly from the vaguer
    # features retrieval gives at test time (trainer.step.blend_features; docs/RESULTS.md "Phase 2 on
    # blended colour features"). 0: always the image's own feature (the paper).
    feature_blend: float = 0.5
    # What a blended feature moves towards: "batch_mean" (the mean of the batch's features) or "retrieved"
    # (the memory's answer for the image by the `retrieval:` options, its own slot left out: the kind of
    # answer test time gives, at one extractor forward per phase-2 step; trainer.loop.Runner._blend_targets).
    feature_blend_towards: str = "batch_mean"

    def validate(self, path: str) -> None:
        if self.steps < 0:
            raise ConfigError(f"{path}.steps must be >= 0, got {self.steps}")
        if not 0 <= self.feature_blend <= 1:
            raise ConfigError(f"{path}.feature_blend must be in [0, 1], got {self.feature_blend}")
        choice(self, path, "feature_blend_towards", ("batch_mean", "retrieved"))
        positive(self, path, "lr", "lr_final")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"{path}.betas must be two numbers in [0, 1), got {list(self.betas)}")


@dataclass(frozen=True)
class MemoryConfig(_Section):
    SECTION = "memory"
    address: str | None = None  # null: rank 0 starts an embedded server in out_dir; "inproc": no server (1 process)
    name: str = "default"
    # Slots, or "auto": 1.2 x the images of data.train (the paper's rule), counted when the run starts
    # (trainer.calibrate.resolve_capacity) and saved as the number.
    capacity: int | str = 1024
    timeout_ms: int = 30000
    retries: int = 3
    durability: str = "always"  # embedded server only
    # Send each phase-1 update without waiting for its reply (collected before the next query, so the
    # memory is the same bit for bit); false: wait for every reply, as before.
    pipeline: bool = True
    # Phase-1 queries read their top-k keys from this process's exact copy of the memory's keys instead
    # of the reply (trainer.keymirror): "auto" in single-process runs (the only writer), true, false.
    # Memories whose keys exceed key_cache_mb keep the keys in the replies.
    key_cache: bool | str = "auto"
    key_cache_mb: int = 512
    # With the key mirror on: keep a replica of the whole memory (memory_server.replica) and answer the
    # phase-1 queries here with the server's code, when the server's index is exact and its backend runs
    # here; the server then sees only the updates. Bounded by key_cache_mb too.
    local_queries: bool = True

    def validate(self, path: str) -> None:
        positive(self, path, "timeout_ms", "key_cache_mb")
        auto_or(self, path, "capacity", "a number of slots > 0", lambda v: v > 0)
        auto_or(self, path, "key_cache", "true, false")
        if self.retries < 0:
            raise ConfigError(f"{path}.retries must be >= 0, got {self.retries}")
        choice(self, path, "durability", ("always", "batch", "none"))


@dataclass(frozen=True)
class SpeedConfig(_Section):
    """How the steps run, not what they compute (trainer.speed; docs/PERFORMANCE.md has the measurements)."""

    SECTION = "train"
    channels_last: bool = False  # G, F, D and the phase-2 images in NHWC memory format
    optimizer: str = "default"  # Adam's implementation: "default" (torch's pick), "foreach", "fused", "for_loop"
    compile: bool = False  # torch.compile of G+F and D (phase 2)
    # CUDA graphs (torch.compile's "reduce-overhead" mode) for G+F and D; the phase-2 shapes are static
    # (fixed batch, fixed patch count). CUDA only, and implies compile.
    cuda_graphs: bool = False
    # Intra-op threads of phase 1 on a CPU device, or "auto": the cores this rank may use minus
    # data.workers (at least 1). Phase 1 decodes a batch per ~30 ms step, so its loader workers need
    # cores that torch's spinning OpenMP threads would otherwise hold (2 cores: 1.8x steps/s).
    # Phase 2 keeps torch's own count. Ignored on CUDA.
    phase1_cpu_threads: int | str = "auto"

    def validate(self, path: str) -> None:
        choice(self, path, "optimizer", ("default", "foreach", "fused", "for_loop"))
        auto_or(self, path, "phase1_cpu_threads", "an integer >= 1", lambda t: not isinstance(t, bool) and t >= 1)


@dataclass(frozen=True)
class MetricsConfig(_Section):
    SECTION = "metrics"
    port: int | None = None  # Prometheus base port; rank r serves on port + r; null: off

    def validate(self, path: str) -> None:
        if self.port is not None and not 0 <= self.port < 65536:
            raise ConfigError(f"{path}.port must be in 0..65535 or null, got {self.port}")


@dataclass(frozen=True)
class FewshotConfig(_Section):
    """The few-shot scoreboard's data (launch/fewshot.py): files of the form of flowers102/MANIFEST.md's
    few-shot split, names relative to `images` (relative paths resolve against the working folder)."""

    SECTION = "fewshot"
    base: str = ""  # base-class training images, one name a line
    novel: str = ""  # `label<TAB>image` lines (a `label<TAB>image` header is skipped), in exemplar order:
    # each label's first K images are its exemplars, the images after the largest K its test images
    images: str = ""  # folder the names of both files are relative to
    shots: tuple[int, ...] = (1, 5, 10)  # K, exemplars per novel class
    val_every: int = 20  # every n-th base image is held out as data.val (0: none)

    def validate(self, path: str) -> None:
        if not self.shots or any(k < 1 for k in self.shots):
            raise ConfigError(f"{path}.shots must be a non-empty list of integers >= 1, got {list(self.shots)}")
        if self.val_every < 0 or self.val_every == 1:
            raise ConfigError(f"{path}.val_every must be 0 or >= 2, got {self.val_every}")


@dataclass(frozen=True)
class TrainConfig:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    phase1: Phase1Config = field(default_factory=Phase1Config)
    phase2: Phase2Config = field(default_factory=Phase2Config)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    fewshot: FewshotConfig = field(default_factory=FewshotConfig)
    train: SpeedConfig = field(default_factory=SpeedConfig)


# Keys that only set the length or bookkeeping of a run: they may change on resume.
RESUMABLE_KEYS = (
    "phase1.steps", "phase2.steps", "phase1.val_every", "phase1.patience", "run.checkpoint_every", "run.log_every",
    "run.sample_every", "run.keep_checkpoints", "run.out_dir", "run.collective_timeout_s",
    "run.check_ddp_every_log", "data.workers", "data.cache_mb", "data.train", "data.val", "memory.address",
    "memory.pipeline", "memory.timeout_ms", "memory.retries", "metrics.port", "retrieval.k",
    "retrieval.temperature", "retrieval.mix", "retrieval.flip", "retrieval.anneal", "fewshot.base", "fewshot.novel", "fewshot.images",
    "fewshot.shots", "fewshot.val_every",
    "train.channels_last", "train.optimizer", "train.compile", "train.cuda_graphs",
)
# Keys that fix the shape of a saved model: a change on resume is an error. Every network option is one.
# (model.use_memory changes what G is fed, not any shape: ablations may start from a shared phase 1.)
SHAPE_KEYS = tuple(
    f"model.{net.name}.{f.name}"
    for net in dataclasses.fields(ModelConfig) if dataclasses.is_dataclass(net.default_factory)
    for f in dataclasses.fields(net.default_factory)
) + ("data.image_size", "memory.capacity", "memory.name")

# The flat `model:` section written before issue 11 (configs, run dirs, checkpoints): old key -> new
# path under `model`. `model.extractor` is old when it holds a string (the backbone's name).
LEGACY_MODEL_KEYS = {
    "width": "generator.width", "n_blocks_encoder": "generator.n_blocks_encoder",
    "n_blocks_decoder": "generator.n_blocks_decoder", "antialias": "generator.antialias",
    "mlp_dim": "generator.mlp_dim", "d_width": "discriminator.width", "d_layers": "discriminator.n_layers",
    "num_patches": "sampler.num_patches", "patch_dim": "sampler.dim", "extractor": "extractor.backbone",
    "extractor_dim": "extractor.dim", "extractor_width": "extractor.resnet_width",
}
# Keys that old files hold and that no longer mean anything: read and dropped.
LEGACY_DROPPED = {"data": ("epoch_batches",)}


def config_from_dict(data: dict) -> TrainConfig:
    """A validated TrainConfig from a plain nested dict (of the current schema)."""
    return from_dict(TrainConfig, data, "")


# --- the flat schema of old configs and checkpoints -------------------------------------------------
def _legacy_model_key(key: str, value: Any) -> str | None:
    """The new path under `model` of an old flat model key, or None when `key` is not one."""
    if key == "extractor" and isinstance(value, dict):
        return None  # the new section of the same name
    return LEGACY_MODEL_KEYS.get(key)


def upgrade_legacy(data: dict) -> list[str]:
    """Rewrite a loaded config dict of the flat schema into the nested one, in place; returns the old keys."""
    upgraded = []
    for section, keys in LEGACY_DROPPED.items():
        node = data.get(section)
        for key in keys:
            if isinstance(node, dict) and key in node:
                del node[key]
                upgraded.append(f"{section}.{key}")
    model = data.get("model")
    if not isinstance(model, dict):
        return upgraded
    for key in list(model):
        new = _legacy_model_key(key, model[key])
        if new is None:
            continue
        part, leaf = new.split(".")
        section = model.setdefault(part, {}) if part != key else {}
        value = model.pop(key)
        if part == key:  # `extractor: name` becomes `extractor: {backbone: name}`
            model[part] = section
        if not isinstance(section, dict) or leaf in section:
            raise ConfigError(f"model.{key} (the old flat schema) and model.{new} are both given")
        section[leaf] = value
        upgraded.append(f"model.{key}")
    return upgraded


def apply_override(data: dict, override: str) -> None:
    """Apply one `dotted.key=value` override in place; the value is parsed as YAML.

    An old flat model key (`model.width=8`) is applied at its new path (`model.generator.width`).
    """
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like key.path=value")
    key, raw = override.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {override!r} has an empty key component")
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {key}: cannot parse value {raw!r}: {e}") from e
    if len(parts) == 2 and parts[0] == "model" and _legacy_model_key(parts[1], value) is not None:
        new = f"model.{_legacy_model_key(parts[1], value)}"
        log.warning("override %s is of the old flat schema; applied as %s", key, new)
        parts = new.split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: {'.'.join(parts[: i + 1])} is not a section")
        node = child
    node[parts[-1]] = value


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """YAML file (or none: the defaults) plus dotted overrides -> validated TrainConfig.

    A file of the flat schema (a run or checkpoint from before issue 11) is upgraded on the way in.
    """
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from e
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping at the top level")
        data = loaded or {}
        upgraded = upgrade_legacy(data)
        if upgraded:
            log.info("%s is of the old flat schema; read %s at their new places", p, ", ".join(upgraded))
    for override in overrides:
        apply_override(data, override)
    return config_from_dict(data)


def load_saved_config(path: str | Path) -> TrainConfig:
    """The config of a checkpoint, run or bundle. One saved before a key existed keeps what it was made
    with (a saved config holds every key of its day): the paper's top-1 retrieval without a `retrieval`
    section, the image's own colour feature in phase 2 without `phase2.feature_blend`."""
    cfg = load_config(path)
    raw = yaml.safe_load(Path(path).read_text()) or {}
    if "retrieval" not in raw:
        cfg = dataclasses.replace(cfg, retrieval=RetrievalConfig(k=1, flip=False))
    if "feature_blend" not in (raw.get("phase2") or {}):
        cfg = dataclasses.replace(cfg, phase2=dataclasses.replace(cfg.phase2, feature_blend=0.0))
    return cfg


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    """Write the resolved config as YAML."""
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def resume_differences(saved: TrainConfig, current: TrainConfig) -> dict[str, list[str]]:
    """Dotted keys that differ between a checkpoint's config and the current one, by kind.

    'bookkeeping': may change freely; 'shape': changes the saved model's shape (an error on resume);
    'other': hyper-parameters (allowed, but the trainer warns).
    """
    a, b = flatten(config_to_dict(saved)), flatten(config_to_dict(current))
    changed = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    return {
        "bookkeeping": [k for k in changed if k in RESUMABLE_KEYS],
        "shape": [k for k in changed if k in SHAPE_KEYS],
        "other": [k for k in changed if k not in RESUMABLE_KEYS and k not in SHAPE_KEYS],
    }


def retrieval_with(cfg: TrainConfig, overrides: list[str] | tuple[str, ...] = ()) -> RetrievalConfig:
    """cfg's `retrieval:` section with "key=value" overrides ("k=1" or "retrieval.k=1"), validated as a config
    is: what `--retrieval-option` of colorize, evaluate and the studio give."""
    if not overrides:
        return cfg.retrieval
    data = config_to_dict(cfg)
    for item in overrides:
        apply_override(data, item if item.startswith("retrieval.") else f"retrieval.{item}")
    return config_from_dict(data).retrieval
