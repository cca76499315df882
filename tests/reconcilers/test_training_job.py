"""The training Job as the kubelet and Linux will take it: where the trainer's termination message goes, and a
command line that exec accepts for any spec the CRD admits (or a clear refusal before the Job exists)."""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest
from pydantic import BaseModel, ConfigDict

from cartridges import api
from cartridges.contract import EXIT_INTERRUPTED, TRAINER_GRACE_S, TrainerConfig
from cartridges_operator import manifests
from cartridges_operator.config import OperatorConfig

BODY = {"kind": "Cartridge", "metadata": {"name": "c", "namespace": "ns", "uid": "u"}}
WORST_CHARACTER = "\x01"  # six bytes in JSON (\u0001): the most any admitted character costs


def trainer_config(text: str, descriptions: list[str], training: dict[str, Any] | None = None) -> TrainerConfig:
    spec = api.CartridgeSpec.model_validate({
        "corpusRefs": [{"name": f"c{i}"} for i in range(len(descriptions))],
        "baseModel": {"name": "m", "uri": "s3://b/m.gguf"}, "size": 512,
        "initialization": {"strategy": "text", "text": text}, "training": training or {},
    })  # fmt: skip
    prefixes = [f"s3://b/corpora/ns/c{i}/{'ab' * 32}" for i in range(len(descriptions))]
    return TrainerConfig(namespace="ns", cartridge="c", generation=1, store_root="s3://b", corpus_prefixes=prefixes,
                         corpus_description=" ".join(descriptions), spec=spec)  # fmt: skip


def container(trainer: TrainerConfig) -> dict[str, Any]:
    job = manifests.training_job(BODY, trainer, OperatorConfig(store_root="s3://b"))
    found: dict[str, Any] = job["spec"]["template"]["spec"]["containers"][0]
    return found


def sent_config(trainer: TrainerConfig) -> str:
    """The config the Job's trainer container is given."""
    args = container(trainer)["args"]
    assert args[0] == "--config"
    config: str = args[1]
    return config


class TrainingBeforeEpochs(BaseModel):
    """spec.training as trainer images from before epochs and maxGradNorm read it: fields they do not know are
    refused, and steps is an int."""

    model_config = ConfigDict(extra="forbid")
    steps: int = api.DEFAULT_STEPS
    learningRate: float = 0.02
    batchSize: int = 16
    sequenceLength: int = 1024


@pytest.mark.parametrize("training", [{}, {"steps": 120}, {"learningRate": 0.01, "batchSize": 4}])
def test_a_spec_without_the_newer_training_fields_gives_a_config_an_older_trainer_accepts(
    training: dict[str, Any],
) -> None:
    """A trainer image pinned by tag may be older than the operator: unset optional fields are left out, not sent as
    null, and the config still reads back as the same one."""
    trainer = trainer_config("facts", ["d"], training)
    sent = sent_config(trainer)
    sent_training = json.loads(sent)["spec"]["training"]
    assert {"steps", "epochs", "maxGradNorm"} & sent_training.keys() == {"steps"} & training.keys()
    older = TrainingBeforeEpochs.model_validate(sent_training)
    assert older.steps == trainer.spec.training.total_steps(conversations=1)
    assert TrainerConfig.model_validate_json(sent) == trainer


@pytest.mark.parametrize("quantization", ["none", "int8", "fp8"])
def test_a_spec_that_does_not_quantize_gives_a_config_a_trainer_from_before_quantization_accepts(
    quantization: str,
) -> None:
    """The CRD defaults spec.quantization to "none": sent as such, a trainer image older than the field would refuse
    every Cartridge, quantized or not. It is left out, and reads back as "none"; int8 and fp8 are sent."""
    trainer = trainer_config("facts", ["d"])
    trainer.spec = trainer.spec.model_copy(update={"quantization": quantization})
    sent = sent_config(trainer)
    assert json.loads(sent)["spec"].get("quantization") == (None if quantization == "none" else quantization)
    assert TrainerConfig.model_validate_json(sent) == trainer


@pytest.mark.parametrize("training", [{"epochs": 3}, {"steps": 50, "maxGradNorm": 1.0}])
def test_newer_training_fields_that_are_set_reach_the_trainer(training: dict[str, Any]) -> None:
    trainer = trainer_config("facts", ["d"], training)
    sent = sent_config(trainer)
    assert json.loads(sent)["spec"]["training"].items() >= training.items()
    assert TrainerConfig.model_validate_json(sent) == trainer


def test_the_trainer_is_told_where_the_kubelet_reads_its_termination_message() -> None:
    """No kubelet sets $TERMINATION_MESSAGE_PATH: the Job sets it to the container's terminationMessagePath."""
    trainer = container(trainer_config("facts", ["d"]))
    env = {e["name"]: e.get("value") for e in trainer["env"]}
    assert env["TERMINATION_MESSAGE_PATH"] == trainer["terminationMessagePath"] == "/dev/termination-log"


def test_a_stopped_trainer_pod_has_the_grace_period_it_needs_to_checkpoint() -> None:
    """SIGTERM (preemption, drain) to SIGKILL is the time to finish a step and upload its checkpoint: longer than
    Kubernetes' default 30 s, and what the trainer's multi-GPU launcher gives its ranks."""
    job = manifests.training_job(BODY, trainer_config("facts", ["d"]), OperatorConfig(store_root="s3://b"))
    assert job["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == TRAINER_GRACE_S > 30


def test_a_trainer_stopped_by_sigterm_is_retried_without_spending_the_backoff_limit_until_the_deadline() -> None:
    """A pod deleted without a DisruptionTarget condition (``kubectl delete pod``) checkpointed and exits
    EXIT_INTERRUPTED: the Job ignores that failure, and only its activeDeadlineSeconds bounds such retries."""
    job = manifests.training_job(BODY, trainer_config("facts", ["d"]), OperatorConfig(store_root="s3://b"))
    ignored = [r.get("onExitCodes") for r in job["spec"]["podFailurePolicy"]["rules"] if r["action"] == "Ignore"]
    assert {"containerName": "trainer", "operator": "In", "values": [EXIT_INTERRUPTED]} in ignored
    assert job["spec"]["template"]["spec"]["containers"][0]["name"] == "trainer"
    assert job["spec"]["activeDeadlineSeconds"] > 0


def test_the_longest_initialization_text_the_crd_admits_still_execs() -> None:
    """Linux refuses an argument over 128 KiB (E2BIG) and the container could never start."""
    text = WORST_CHARACTER * api.MAX_INIT_TEXT
    args = container(trainer_config(text, ["a description of the corpus"]))["args"]
    assert max(len(arg.encode()) for arg in args) <= manifests.MAX_ARGUMENT_BYTES
    subprocess.run(["/bin/true", *args], check=True)


def test_a_config_over_the_argument_limit_is_refused_with_what_to_shorten() -> None:
    descriptions = ["長" * 2000] * 16  # sixteen corpora with the longest descriptions, three bytes a character
    with pytest.raises(manifests.ConfigTooLarge, match="shorten spec.initialization.text or the descriptions"):
        container(trainer_config("知" * api.MAX_INIT_TEXT, descriptions))
