"""Typed API of the ``cartridges.dev/v1alpha1`` resources: the single source of truth for the CRDs (DESIGN.md §3).

Field names are the Kubernetes camelCase names. Rules the OpenAPI schema cannot say (exactly one source kind,
immutability, cross-field ranges) are CEL expressions attached with :func:`cel`, and land in the generated CRDs as
``x-kubernetes-validations``; those the models must check too (they read settings no API server has checked) are
a :class:`Ruled` model's ``RULES``, each said once for both.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from cartridges.layout import MAX_RESOURCE_NAME, RESOURCE_NAME

GROUP = "cartridges.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
MIN_SIZE, MAX_SIZE = 16, 65536
MAX_INIT_TEXT = 16384
"""Characters of spec.initialization.text: even at 6 bytes each in JSON (control characters), it leaves a third of
the trainer's one command-line argument (128 KiB) to the rest of its config."""
# The Cartridge spec fields a trained artifact depends on: a change to one of them trains a new generation.
TRAINING_FIELDS = (
    "corpusRefs", "baseModel", "size", "initialization", "frozenTokens", "selfStudy", "training", "quantization",
)  # fmt: skip
StorageQuantization = Literal["none", "int8", "fp8"]
DEFAULT_STEPS = 1000


def cel(*rules: tuple[str, str]) -> dict[str, Any]:
    """``json_schema_extra`` carrying CEL rules as (expression, message) pairs."""
    return {"x-kubernetes-validations": [{"rule": rule, "message": message} for rule, message in rules]}


class Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


@dataclass(frozen=True)
class Rule:
    """A rule between a model's fields, said once for both of its checkers: the API server (``expression``, CEL in
    the CRD) and pydantic (``holds``, for what reaches the models without it, such as the chart's settings)."""

    expression: str
    holds: Callable[[Any], bool]
    message: str


def _rules_as_cel(schema: dict[str, Any], model: type[Any]) -> None:
    schema.update(cel(*((rule.expression, rule.message) for rule in model.RULES)))


class Ruled(Spec):
    """A spec whose ``RULES`` land in the CRD as CEL and are checked by pydantic on every validation."""

    model_config = ConfigDict(json_schema_extra=_rules_as_cel)
    RULES: ClassVar[tuple[Rule, ...]] = ()

    @model_validator(mode="after")
    def _rules_hold(self) -> Ruled:
        broken = [rule.message for rule in self.RULES if not rule.holds(self)]
        if broken:  # the message alone, as the API server gives it (no "Value error, " before it)
            raise PydanticCustomError("rule", "{rules}", {"rules": "; ".join(broken)})
        return self


class ConfigMapKeyRef(Spec):
    name: str = Field(
        min_length=1,
        max_length=MAX_RESOURCE_NAME,
        pattern=RESOURCE_NAME.pattern,
        description="a ConfigMap in the Corpus's namespace",
    )
    key: str = Field(
        min_length=1,
        max_length=253,
        pattern=r"^[-._a-zA-Z0-9]+$",
        description="a key of its data, or of its binaryData (UTF-8 text)",
    )


class ObjectSource(Spec):
    """One object, or every object under a prefix (``uri`` ending in ``/``) filtered by globs."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra=cel(
            (  # globs on one object would be ignored: a prefix missing its "/" would read one object, or none
                "self.uri.endsWith('/') || ((!has(self.include) || size(self.include) == 0) && "
                "(!has(self.exclude) || size(self.exclude) == 0))",
                "include and exclude filter the objects under a prefix: end uri with / to read a prefix",
            )
        ),
    )

    uri: str = Field(
        pattern=r"^(s3://[^/]+|file://(localhost)?)/.*",
        description="s3://bucket/key, or s3://bucket/prefix/ for many. In the store's own bucket only under "
        "<store root>/sources/<namespace>/; file:// only for an operator run locally with a file:// store",
    )
    include: list[str] = Field(default_factory=list, max_length=64, description="globs relative to the prefix")
    exclude: list[str] = Field(default_factory=list, max_length=64)


class HttpSource(Spec):
    url: str = Field(pattern=r"^https?://.+")
    maxBytes: int = Field(
        default=16 * 1024 * 1024,
        ge=1,
        le=1024 * 1024 * 1024,
        description="largest body accepted; the operator's limit for all of a Corpus's sources applies as well",
    )
    timeoutSeconds: int = Field(default=30, ge=1, le=600, description="for the whole download, not per read")


class CorpusSource(Spec):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra=cel(
            (
                "[has(self.inline), has(self.configMap), has(self.object), has(self.http)].filter(x, x).size() == 1",
                "each source sets exactly one of inline, configMap, object, http",
            )
        ),
    )

    name: str | None = Field(default=None, max_length=253, description="document name; defaults to the source")
    inline: str | None = Field(default=None, max_length=1024 * 1024)
    configMap: ConfigMapKeyRef | None = None
    object: ObjectSource | None = None
    http: HttpSource | None = None


class CorpusSpec(Spec):
    description: str = Field(min_length=1, max_length=2000, description="one line used in self-study prompts")
    sources: list[CorpusSource] = Field(min_length=1, max_length=256)
    tokenizer: str | None = Field(
        default=None,
        pattern=r"^(s3|file)://.+",
        description="tokenizer.json, or an HF model directory holding one, whose tokenizer counts status.tokens. "
        "In the operator's store only under sources/<namespace>/ or models/; other buckets as corpus.sourceBuckets "
        "allows; at most 64 MiB; file:// only for an operator run locally with a file:// store",
    )


class Condition(Spec):
    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str = ""
    message: str = ""
    lastTransitionTime: str | None = None
    observedGeneration: int | None = None


class CorpusStatus(Spec):
    observedGeneration: int | None = None
    digest: str | None = None
    documents: int | None = None
    bytes: int | None = None
    tokens: int | None = None
    artifact: str | None = None
    conditions: list[Condition] = Field(default_factory=list)


class CorpusRef(Spec):
    name: str = Field(min_length=1, max_length=253)
    digest: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$", description="pin a corpus version")


class BaseModelRef(Spec):
    name: str = Field(min_length=1, max_length=63, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    uri: str = Field(pattern=r"^(s3|file)://.+", description="HF directory prefix or a .gguf object")


class Initialization(Spec):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra=cel(
            (
                "self.strategy == 'text' ? has(self.text) : !has(self.text)",
                "text is set exactly when strategy is text",
            )
        ),
    )

    strategy: Literal["corpus", "text", "random"] = "corpus"
    text: str | None = Field(
        default=None,
        max_length=MAX_INIT_TEXT,
        description="the first KV rows: its tokens, repeated or cut to spec.size; at most 16384 characters (it "
        "travels in the trainer's command line, which Linux limits to 128 KiB per argument)",
    )


SeedPrompt = Literal["structuring", "summarization", "question", "use_case", "creative"]
SEED_PROMPTS: tuple[SeedPrompt, ...] = ("structuring", "summarization", "question", "use_case", "creative")


Recipe = Literal["grounded", "paper"]


def _all_seed_prompts() -> list[SeedPrompt]:
    return list(SEED_PROMPTS)


class SelfStudy(Spec):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra=cel(
            ("self.minChunkTokens <= self.maxChunkTokens", "minChunkTokens must not exceed maxChunkTokens")
        ),
    )

    recipe: Recipe = Field(
        default="grounded",
        description=(
            "grounded: questions and blanks about every fact of the corpus, answered with its own words, the teacher "
            "reading the whole corpus when it fits; works with small models. paper: the seed prompts of Eyuboglu "
            "et al. 2025, questions and answers written by the model about random chunks; for capable models"
        ),
    )
    conversations: int = Field(default=8192, ge=1, le=10_000_000)
    minChunkTokens: int = Field(default=512, ge=16, le=32768)
    maxChunkTokens: int = Field(default=4096, ge=16, le=32768)
    seedPrompts: list[SeedPrompt] = Field(default_factory=_all_seed_prompts, min_length=1)
    temperature: float = Field(default=0.6, ge=0.0, le=2.0)
    topK: int = Field(default=20, ge=1, le=256, description="teacher log-probs kept per token")


class Training(Ruled):
    """Distillation: for steps or for epochs (not both; 1000 steps when neither is set)."""

    # Neither steps nor epochs has a default, in the CRD or in the spec the API server stores: it defaults before
    # CEL validates, so a default steps would refuse every epochs added later. total_steps and the training hash
    # apply DEFAULT_STEPS instead.
    RULES = (
        Rule(
            "!has(self.steps) || !has(self.epochs)",
            lambda t: t.steps is None or t.epochs is None,
            "set steps or epochs, not both "
            "(a Cartridge created before epochs existed was given steps: 1000: remove it)",
        ),
    )

    steps: int | None = Field(
        default=None, ge=1, le=10_000_000, description=f"Adam steps; {DEFAULT_STEPS} when epochs is unset"
    )
    epochs: int | None = Field(
        default=None,
        ge=1,
        le=10_000,
        description="passes over the synthesized conversations that fit sequenceLength, each seeing every one once, "
        "instead of steps: ceil(epochs x conversations / batchSize) steps",
    )
    learningRate: float = Field(default=0.02, gt=0.0, le=1.0)
    batchSize: int = Field(default=16, ge=1, le=4096)
    sequenceLength: int = Field(default=1024, ge=32, le=131072)
    maxGradNorm: float | None = Field(
        default=None,
        gt=0.0,
        description="clip the total gradient norm of the cartridge to this before each step; unset: no clipping",
    )

    def total_steps(self, conversations: int) -> int:
        """The Adam steps of a run on ``conversations`` usable conversations."""
        if self.epochs is None:
            return self.steps or DEFAULT_STEPS
        return math.ceil(self.epochs * conversations / self.batchSize)

    def hashed(self) -> dict[str, Any]:
        """These settings as the training hash sees them: unset epochs and maxGradNorm left out and the default steps
        filled in, as before they existed, so no Cartridge retrains for them."""
        settings = self.model_dump(mode="json", exclude_none=True)
        return settings if self.epochs is not None else {"steps": DEFAULT_STEPS, **settings}


class Toleration(Ruled):
    """A Kubernetes toleration of the training pods; the rules are the ones the API server checks on the Job."""

    # Also the model of the chart's serving.tolerations (the docstring is the CRD's description, kept unchanged).

    RULES = (
        Rule(
            "!has(self.operator) || self.operator != 'Exists' || !has(self.value) || self.value == ''",
            lambda t: t.operator != "Exists" or not t.value,
            "value must be empty when operator is Exists",
        ),
        Rule(
            "!has(self.tolerationSeconds) || (has(self.effect) && self.effect == 'NoExecute')",
            lambda t: t.tolerationSeconds is None or t.effect == "NoExecute",
            "tolerationSeconds requires effect NoExecute",
        ),
        Rule(
            "(has(self.key) && self.key != '') || (has(self.operator) && self.operator == 'Exists')",
            lambda t: bool(t.key) or t.operator == "Exists",
            "operator must be Exists when key is empty (a toleration of every taint)",
        ),
    )

    key: str | None = None
    operator: Literal["Exists", "Equal"] | None = None
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    tolerationSeconds: int | None = None


class Resources(Spec):
    gpus: int = Field(default=1, ge=0, le=64)
    memory: str = Field(default="32Gi", pattern=r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|K|M|G|T)?$")
    cpu: str = Field(default="4", pattern=r"^[0-9]+(\.[0-9]+)?m?$")
    nodeSelector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list)
    priorityClassName: str | None = None


class QualityGate(Spec):
    minIclGainRecovered: float | None = Field(default=None, ge=0.0, le=2.0, description="promote only above this")


class Serving(Spec):
    enabled: bool = True
    replicas: int = Field(default=1, ge=0, le=64)
    qualityGate: QualityGate = Field(default_factory=QualityGate)


class CartridgeSpec(Spec):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra=cel(
            ("self.frozenTokens < self.size", "frozenTokens must be smaller than size"),
            (
                "self.baseModel == oldSelf.baseModel",
                "baseModel is immutable: create a new Cartridge for another model",
            ),
        ),
    )

    corpusRefs: list[CorpusRef] = Field(min_length=1, max_length=16)
    baseModel: BaseModelRef
    size: int = Field(
        default=2048,
        ge=MIN_SIZE,
        le=MAX_SIZE,
        multiple_of=16,
        description="p: trainable KV tokens per layer (a multiple of 16)",
    )
    initialization: Initialization = Field(default_factory=Initialization)
    frozenTokens: int = Field(default=1, ge=0, le=MAX_SIZE, description="leading tokens kept fixed (attention sink)")
    selfStudy: SelfStudy = Field(default_factory=SelfStudy)
    training: Training = Field(default_factory=Training)
    resources: Resources = Field(default_factory=Resources)
    serving: Serving = Field(default_factory=Serving)
    quantization: StorageQuantization = Field(
        default="none",
        description="store the trained cartridge in one byte per element (keys scaled per channel, values per "
        "token): half the bytes of bf16 to keep and to read each decode step. The evaluation scores the stored "
        "cartridge (status.evaluation.cartridgeUnquantized: before quantization); a change trains a new generation",
    )
    retention: Literal["Delete", "Retain"] = Field(default="Retain", description="what deletion does to artifacts")
    keepGenerations: int | None = Field(
        default=None,
        ge=2,
        le=1000,
        description="trained generations kept in the store: the promoted one and the newest before it; every other "
        "generation up to the promoted one (synthesized data, checkpoints, artifact; failed ones too) is deleted, "
        "and its Job. At least 2, so replicas still loading the previous one find it. Unset: all are kept",
    )
    suspend: bool = False

    def training_inputs(self) -> dict[str, Any]:
        """The TRAINING_FIELDS of this spec, as JSON values; quantization, training.epochs and
        training.maxGradNorm only when set, so the Cartridges trained before they existed keep their training hash
        (and are not retrained)."""
        inputs = self.model_dump(include=set(TRAINING_FIELDS), mode="json")
        if inputs["quantization"] == "none":
            del inputs["quantization"]
        inputs["training"] = self.training.hashed()
        return inputs


class Measured(Spec):
    """Numbers the trainer wrote, on their way into status: NaN and infinity are refused (JSON has neither, and the
    API server refuses a status holding one; a NaN score would also compare as passing a quality gate)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, allow_inf_nan=False)


class Progress(Measured):
    phase: str | None = None
    step: int | None = None
    total: int | None = None
    loss: float | None = None
    etaSeconds: int | None = None


class ArtifactStatus(Spec):
    uri: str
    sha256: str
    bytes: int
    p: int
    dtype: str


class PromotedStatus(Spec):
    """What current.json names: the generation serving loads, which a newer verified one the quality gate held back
    (status.artifact) does not replace."""

    generation: int
    uri: str
    sha256: str


class Evaluation(Measured):
    noContext: float | None = None
    icl: float | None = None
    cartridge: float | None = None
    cartridgeUnquantized: float | None = Field(default=None, description="with spec.quantization: before it")
    iclGainRecovered: float | None = None


def icl_gain(no_context: float, icl: float) -> float | None:
    """How much the corpus in context (ICL) lowers the answer NLL; None when it does not (no gain to recover)."""
    gain = no_context - icl
    return gain if gain > 0 else None


def icl_gain_recovered(no_context: float, icl: float, cartridge: float) -> float | None:
    """``iclGainRecovered``: (noContext - cartridge) / (noContext - icl), 1 when the cartridge is as good as ICL.
    None when ICL gave no gain: dividing by a gain of zero or less would score a cartridge worse than no context
    as recovering a large positive fraction."""
    gain = icl_gain(no_context, icl)
    return None if gain is None else (no_context - cartridge) / gain


NOTHING_SCORED = "no held-out question was left to score (each one equalled a training conversation)"


def recovered_text(recovered: float | None, scored: bool = True) -> str:
    """``iclGainRecovered`` as people read it: ``64%``, or why there is no score (``scored``: whether any held-out
    question was scored at all, as ``icl`` being set says)."""
    if recovered is not None:
        return f"{recovered:.0%}"
    return "n/a (ICL gave no gain to recover)" if scored else f"n/a ({NOTHING_SCORED})"


class Endpoint(Spec):
    url: str
    model: str
    cartridge: str


class Failure(Spec):
    reason: str
    message: str = ""
    exitCode: int | None = None
    pod: str | None = None
    time: str | None = None


class CartridgeStatus(Spec):
    observedGeneration: int | None = None
    generation: int | None = Field(default=None, description="training generation (g<N> in the store)")
    trainingHash: str | None = Field(default=None, description="hash of the spec fields and corpus digests trained")
    progress: Progress | None = None
    artifact: ArtifactStatus | None = None
    evaluation: Evaluation | None = None
    promoted: PromotedStatus | None = Field(
        default=None, description="the promoted generation (current.json), the one served; unset while none is"
    )
    endpoint: Endpoint | None = None
    trainingJob: str | None = None
    lastFailure: Failure | None = None
    conditions: list[Condition] = Field(default_factory=list)
