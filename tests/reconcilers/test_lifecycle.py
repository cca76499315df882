"""Cartridge lifecycle edges on the real control plane: suspend, corpus changes, restarts, bad artifacts, retention."""

from __future__ import annotations

import functools
import time
from typing import Any

import pytest
from fake_trainer import RELEASE_FILE
from kubernetes import client

from cartridges import api, layout
from cartridges.manifest import TENSORS_FILE
from cartridges_e2e.operator_env import OperatorEnv, wait_for
from cartridges_operator import manifests

pytestmark = pytest.mark.cluster


def cartridge_spec(corpus: str, **overrides: Any) -> dict[str, Any]:
    spec = {"corpusRefs": [{"name": corpus}], "baseModel": {"name": "tiny", "uri": "file:///models/tiny"},
            "size": 16, "resources": {"gpus": 0}, "serving": {"enabled": False}}  # fmt: skip
    return {**spec, **overrides}


def status(env: OperatorEnv, name: str) -> dict[str, Any]:
    return dict((env.get("cartridges", name) or {}).get("status") or {})


def jobs(env: OperatorEnv, cartridge: str) -> list[str]:
    found = client.BatchV1Api(env.api).list_namespaced_job(
        env.namespace, label_selector=f"{manifests.CARTRIDGE_LABEL}={manifests.cartridge_label(cartridge)}"
    )
    return sorted(j.metadata.name for j in found.items)


def test_suspend_holds_the_job_and_resume_trains(operator_env: OperatorEnv) -> None:
    env = operator_env
    env.create("corpora", "paused", {"description": "d", "sources": [{"inline": "Paused facts."}]})
    env.create("cartridges", "paused", cartridge_spec("paused", suspend=True))
    ready = env.wait_condition("cartridges", "paused", "Ready", "False")
    wait_for("Suspended", lambda: (env.condition("cartridges", "paused", "Ready") or {}).get("reason") == "Suspended")
    job = client.BatchV1Api(env.api).read_namespaced_job("paused-g1", env.namespace)
    assert job.spec.suspend is True and ready["status"] == "False"
    pods = client.CoreV1Api(env.api).list_namespaced_pod(env.namespace, label_selector="job-name=paused-g1")
    assert pods.items == []
    env.patch_spec("cartridges", "paused", {"suspend": False})
    env.wait_condition("cartridges", "paused", "Ready", "True")  # serving disabled: Ready once trained
    assert jobs(env, "paused") == ["paused-g1"]


def test_corpus_change_bumps_generation_and_operator_restart_keeps_state(operator_env: OperatorEnv) -> None:
    env = operator_env
    env.create("corpora", "evolving", {"description": "d", "sources": [{"inline": "Version one."}]})
    env.create("cartridges", "evolving", cartridge_spec("evolving"))
    env.wait_condition("cartridges", "evolving", "Ready", "True")
    first = status(env, "evolving")
    assert first["generation"] == 1

    env.restart()  # a restarted operator finds the finished Job and changes nothing
    env.patch_spec("cartridges", "evolving", {"serving": {"enabled": False, "replicas": 3}})
    wait_for("a pass after restart", lambda: status(env, "evolving")["observedGeneration"] == 2)
    assert status(env, "evolving")["generation"] == 1 and jobs(env, "evolving") == ["evolving-g1"]

    env.patch_spec("corpora", "evolving", {"sources": [{"inline": "Version two."}]})
    wait_for("generation 2", lambda: status(env, "evolving").get("generation") == 2)
    env.wait_condition("cartridges", "evolving", "Ready", "True")
    assert jobs(env, "evolving") == ["evolving-g1", "evolving-g2"]
    pointer = env.store.get_json(layout.current_pointer(env.store_root, env.namespace, "evolving"))
    assert pointer["generation"] == 2


def test_corrupt_artifact_is_not_promoted(operator_env: OperatorEnv) -> None:
    env = operator_env
    env.create("corpora", "corrupt", {"description": "d", "sources": [{"inline": "CORRUPT-ARTIFACT"}]})
    env.create("cartridges", "corrupt", cartridge_spec("corrupt"))
    stalled = env.wait_condition("cartridges", "corrupt", "Stalled", "True", timeout_s=90)
    assert stalled["reason"] == "ArtifactInvalid" and "sha256" in stalled["message"]
    assert not env.store.exists(layout.current_pointer(env.store_root, env.namespace, "corrupt"))


def test_tensors_altered_after_upload_are_not_promoted_and_the_promoted_generation_stays(
    operator_env: OperatorEnv,
) -> None:
    """The recorded sha256 matches the manifest, the bytes do not: the operator hashes them before promoting, once
    while the object stays as it is, again when it is replaced; the replaced bytes that match are promoted."""
    env = operator_env
    env.create("corpora", "rotting", {"description": "d", "sources": [{"inline": "Sound facts."}]})
    env.create("cartridges", "rotting", cartridge_spec("rotting"))
    env.wait_condition("cartridges", "rotting", "Ready", "True")
    env.patch_spec("corpora", "rotting", {"sources": [{"inline": "BITROT-ARTIFACT facts."}]})
    wait_for("generation 2", lambda: status(env, "rotting").get("generation") == 2)
    stalled = env.wait_condition("cartridges", "rotting", "Stalled", "True", timeout_s=90)
    assert stalled["reason"] == "ArtifactInvalid" and "is corrupt: its bytes hash to sha256" in stalled["message"]
    pointer = env.store.get_json(layout.current_pointer(env.store_root, env.namespace, "rotting"))
    assert pointer["generation"] == 1, "the corrupt generation replaced the working one"
    assert status(env, "rotting")["artifact"]["uri"].endswith("/g1/cartridge.safetensors")

    tensors = f"{layout.generation_prefix(env.store_root, env.namespace, 'rotting', 2)}/{TENSORS_FILE}"

    def hashed() -> int:
        """How often the operator hashed generation 2's tensors (it logs each hash)."""
        return env.operator.log_path.read_text().count(f"hashed {tensors} ")

    time.sleep(12)  # two more passes of the 5 s resync, each finding the same corrupt object
    assert hashed() == 1
    sound = bytearray(env.store.get_head(tensors, env.store.stat(tensors).size))
    sound[-1] ^= 0xFF  # the rot undone: the bytes the manifest describes, uploaded again
    env.store.put_bytes(tensors, bytes(sound))
    wait_for("generation 2 promoted", lambda: env.store.get_json(layout.current_pointer(
        env.store_root, env.namespace, "rotting"))["generation"] == 2)  # fmt: skip
    assert hashed() == 2


def test_missing_store_secret_stalls_then_recovers(operator_env: OperatorEnv) -> None:
    env = operator_env
    core = client.CoreV1Api(env.api)
    keys = core.read_namespaced_secret("cartridges-store", env.namespace).data
    core.delete_namespaced_secret("cartridges-store", env.namespace)
    try:
        env.create("corpora", "nosecret", {"description": "d", "sources": [{"inline": "Secret facts."}]})
        env.create("cartridges", "nosecret", cartridge_spec("nosecret"))
        stalled = env.wait_condition("cartridges", "nosecret", "Stalled", "True")
        assert stalled["reason"] == "StoreSecretMissing" and "cartridges-store" in stalled["message"]
        assert jobs(env, "nosecret") == []
    finally:
        core.create_namespaced_secret(env.namespace, {"metadata": {"name": "cartridges-store"}, "data": keys})
    env.wait_condition("cartridges", "nosecret", "Ready", "True")


def test_empty_corpus_stalls_and_recovers_when_fixed(operator_env: OperatorEnv) -> None:
    env = operator_env
    env.create("corpora", "blank", {"description": "d", "sources": [{"inline": "   \n  "}]})
    stalled = env.wait_condition("corpora", "blank", "Stalled", "True")
    assert stalled["reason"] == "InvalidSource" and "empty" in stalled["message"]
    env.create("cartridges", "blank", cartridge_spec("blank"))
    waiting = env.wait_condition("cartridges", "blank", "CorpusReady", "False")
    assert waiting["reason"] == "WaitingForCorpus"
    assert waiting["message"] == f"Corpus blank is not Ready (InvalidSource: {stalled['message']})"
    env.patch_spec("corpora", "blank", {"sources": [{"inline": "Now there is text."}]})
    env.wait_condition("corpora", "blank", "Ready", "True")
    env.wait_condition("cartridges", "blank", "CorpusReady", "True")


def test_retain_keeps_artifacts_after_deletion(operator_env: OperatorEnv) -> None:
    env = operator_env
    env.create("corpora", "kept", {"description": "d", "sources": [{"inline": "Facts to keep."}]})
    env.create("cartridges", "kept", cartridge_spec("kept"))
    env.wait_condition("cartridges", "kept", "Trained", "True")
    env.custom.delete_namespaced_custom_object(api.GROUP, api.VERSION, env.namespace, "cartridges", "kept")
    wait_for("cartridge deleted", lambda: env.get("cartridges", "kept") is None)
    assert env.store.exists(f"{layout.generation_prefix(env.store_root, env.namespace, 'kept', 1)}/manifest.json")


def test_failed_new_generation_keeps_the_previous_one_promoted(operator_env: OperatorEnv) -> None:
    env = operator_env
    env.create("corpora", "steady", {"description": "d", "sources": [{"inline": "Good facts."}]})
    env.create("cartridges", "steady", cartridge_spec("steady"))
    env.wait_condition("cartridges", "steady", "Ready", "True")
    good = status(env, "steady")["artifact"]
    env.patch_spec("corpora", "steady", {"sources": [{"inline": "PERMANENT-FAILURE"}]})
    stalled = env.wait_condition("cartridges", "steady", "Stalled", "True", timeout_s=90)
    assert stalled["reason"] == "TrainingFailed" and status(env, "steady")["generation"] == 2
    assert status(env, "steady")["artifact"] == good  # generation 1 is still what is served
    pointer = env.store.get_json(layout.current_pointer(env.store_root, env.namespace, "steady"))
    assert pointer["generation"] == 1
    batch = client.BatchV1Api(env.api)
    failed = batch.read_namespaced_job("steady-g2", env.namespace)
    assert failed.spec.ttl_seconds_after_finished is None  # kept: its TTL would start generation 2 again
    batch.delete_namespaced_job("steady-g2", env.namespace, propagation_policy="Foreground")

    def retried() -> bool:
        jobs = batch.list_namespaced_job(env.namespace, field_selector="metadata.name=steady-g2").items
        return any(job.metadata.uid != failed.metadata.uid for job in jobs)

    wait_for("the deleted Job of generation 2 started again", retried, 60)
    assert status(env, "steady")["generation"] == 2


def test_a_status_write_lost_after_a_promotion_is_made_good_when_the_next_generation_starts(
    operator_env: OperatorEnv,
) -> None:
    """The pass that verified and promoted generation 2 lost its status write (the operator killed right after the
    pointer write), and a training input changed before the next pass: while generation 3 trains, status.artifact,
    status.evaluation and status.promoted describe generation 2, the one served, not generation 1. A status without
    status.promoted (written before it existed) gets it from current.json in the next pass, training or not."""
    env = operator_env
    second_prefix = layout.generation_prefix(env.store_root, env.namespace, "lapse", 2)
    env.create("corpora", "lapse", {"description": "d", "sources": [{"inline": "Fact one."}]})
    env.create("corpora", "lapse-slow", {"description": "d", "sources": [{"inline": "SLOW-TRAINING facts."}]})
    env.create("cartridges", "lapse", cartridge_spec("lapse", retention="Delete"))
    env.wait_condition("cartridges", "lapse", "Ready", "True")
    first = status(env, "lapse")
    env.patch_spec("corpora", "lapse", {"sources": [{"inline": "Fact two."}]})
    wait_for("generation 2 recorded", lambda: status(env, "lapse").get("artifact", {}).get("uri", "").startswith(
        f"{second_prefix}/"), 60)  # fmt: skip
    second = status(env, "lapse")
    env.wait_condition("corpora", "lapse-slow", "Ready", "True")  # its digest known: the next pass trains from it
    with env.stopped():
        # generation 1's scores, told apart from generation 2's (the fake trainer writes the same scores for both)
        lost = {"artifact": first["artifact"], "evaluation": {**first["evaluation"], "iclGainRecovered": 0.5},
                "promoted": first["promoted"]}  # fmt: skip
        env.custom.patch_namespaced_custom_object_status(
            api.GROUP, api.VERSION, env.namespace, "cartridges", "lapse", {"status": lost}
        )
        env.patch_spec("cartridges", "lapse", {"corpusRefs": [{"name": "lapse-slow"}]})
    wait_for("generation 3 training", lambda: status(env, "lapse").get("generation") == 3)
    pointer = env.store.get_json(layout.current_pointer(env.store_root, env.namespace, "lapse"))
    training = status(env, "lapse")
    assert pointer["generation"] == 2 and training["artifact"] == second["artifact"]
    assert training["evaluation"] == second["evaluation"] and training["promoted"] == second["promoted"]
    assert training["promoted"]["generation"] == 2
    with env.stopped():  # a status an operator from before status.promoted wrote, while generation 3 trains
        env.custom.patch_namespaced_custom_object_status(
            api.GROUP, api.VERSION, env.namespace, "cartridges", "lapse", {"status": {"promoted": None}}
        )
    wait_for("status.promoted read back", lambda: status(env, "lapse").get("promoted") == second["promoted"])
    assert status(env, "lapse")["generation"] == 3
    env.custom.delete_namespaced_custom_object(api.GROUP, api.VERSION, env.namespace, "cartridges", "lapse")
    wait_for("cartridge deleted, its trainer stopped", lambda: env.get("cartridges", "lapse") is None, 60)


def test_a_job_built_from_a_spec_whose_status_write_was_lost_is_replaced_before_it_trains(
    operator_env: OperatorEnv,
) -> None:
    """The pass that created generation 2's Job for spec.size 32 lost its status write (the operator killed right
    after), and the size changed to 48 before the next pass, which takes number 2 again: the Job built for 32 is
    stopped, and generation 2 trains on 48 (its Job labelled with the inputs' hash)."""
    env = operator_env
    batch = client.BatchV1Api(env.api)
    env.create("corpora", "racing", {"description": "d", "sources": [{"inline": "Racing facts."}]})
    env.create("cartridges", "racing", cartridge_spec("racing"))
    env.wait_condition("cartridges", "racing", "Ready", "True")
    before = status(env, "racing")
    env.patch_spec("cartridges", "racing", {"size": 32, "suspend": True})  # suspended: the Job waits
    wait_for("generation 2's Job", lambda: "racing-g2" in jobs(env, "racing"))
    stale = batch.read_namespaced_job("racing-g2", env.namespace)
    with env.stopped():
        lost = {key: before[key] for key in ("generation", "trainingHash", "trainingJob")}
        env.custom.patch_namespaced_custom_object_status(
            api.GROUP, api.VERSION, env.namespace, "cartridges", "racing", {"status": lost}
        )
        env.patch_spec("cartridges", "racing", {"size": 48})

    def replaced() -> bool:
        found = batch.list_namespaced_job(env.namespace, field_selector="metadata.name=racing-g2").items
        hash_ = status(env, "racing").get("trainingHash")
        return any(j.metadata.uid != stale.metadata.uid and j.metadata.labels.get(
            manifests.TRAINING_HASH_LABEL) == hash_ for j in found)  # fmt: skip

    wait_for("generation 2's Job built for size 48", replaced, 60)
    env.patch_spec("cartridges", "racing", {"suspend": False})
    second = layout.generation_prefix(env.store_root, env.namespace, "racing", 2)
    wait_for("generation 2 promoted", lambda: (status(env, "racing").get("promoted") or {}).get("generation") == 2, 60)
    artifact = status(env, "racing")["artifact"]
    assert (artifact["uri"], artifact["p"]) == (f"{second}/{TENSORS_FILE}", 48)


def test_generations_beyond_keep_generations_are_deleted_with_their_jobs(operator_env: OperatorEnv) -> None:
    """Unset, keepGenerations keeps every generation (as before it existed); set, it deletes the rest at once,
    without retraining, and their Jobs."""
    env = operator_env

    def stored() -> list[int]:
        return layout.stored_generations(env.store, env.store_root, env.namespace, "churn")

    def promoted(generation: int) -> bool:
        pointer = env.store.get_json(layout.current_pointer(env.store_root, env.namespace, "churn"))
        return bool(pointer["generation"] == generation)

    env.create("corpora", "churn", {"description": "d", "sources": [{"inline": "Fact one."}]})
    env.create("cartridges", "churn", cartridge_spec("churn"))
    env.wait_condition("cartridges", "churn", "Ready", "True")
    for generation, text in ((2, "Fact two."), (3, "Fact three.")):
        env.patch_spec("corpora", "churn", {"sources": [{"inline": text}]})
        wait_for(f"generation {generation} promoted", functools.partial(promoted, generation), 60)
    assert stored() == [1, 2, 3] and jobs(env, "churn") == ["churn-g1", "churn-g2", "churn-g3"]
    env.patch_spec("cartridges", "churn", {"keepGenerations": 2})
    wait_for("generation 1 deleted", lambda: stored() == [2, 3])
    wait_for("its Job deleted", lambda: jobs(env, "churn") == ["churn-g2", "churn-g3"])
    assert status(env, "churn")["generation"] == 3  # nothing retrained
    assert env.store.exists(f"{layout.generation_prefix(env.store_root, env.namespace, 'churn', 3)}/manifest.json")


def test_a_prune_cut_short_after_deleting_a_generation_deletes_its_job_after_a_restart(
    operator_env: OperatorEnv,
) -> None:
    """Pruning deletes a generation's files and its Job: an operator killed between the two must not leave the Job
    for ever (a later pass no longer finds the generation in the store)."""
    env = operator_env

    def promoted(generation: int) -> bool:
        pointer = env.store.get_json(layout.current_pointer(env.store_root, env.namespace, "trimmed"))
        return bool(pointer["generation"] == generation)

    env.create("corpora", "trimmed", {"description": "d", "sources": [{"inline": "Fact one."}]})
    env.create("cartridges", "trimmed", cartridge_spec("trimmed"))
    env.wait_condition("cartridges", "trimmed", "Ready", "True")
    for generation, text in ((2, "Fact two."), (3, "Fact three.")):
        env.patch_spec("corpora", "trimmed", {"sources": [{"inline": text}]})
        wait_for(f"generation {generation} promoted", functools.partial(promoted, generation), 60)
    assert jobs(env, "trimmed") == ["trimmed-g1", "trimmed-g2", "trimmed-g3"]
    with env.stopped():  # keepGenerations set, generation 1's files deleted, then the operator was killed
        env.patch_spec("cartridges", "trimmed", {"keepGenerations": 2})
        env.store.delete_prefix(layout.generation_prefix(env.store_root, env.namespace, "trimmed", 1))
    wait_for("generation 1's Job deleted", lambda: jobs(env, "trimmed") == ["trimmed-g2", "trimmed-g3"])


def test_a_recreated_cartridge_never_takes_a_retained_generation_as_its_own(operator_env: OperatorEnv) -> None:
    """Deleted with retention Retain and applied again with another corpus: the trainer finds g1 already trained,
    but from other inputs, so the operator trains under the next free number instead of promoting the old one."""
    env = operator_env
    env.create("corpora", "first-life", {"description": "d", "sources": [{"inline": "The old facts."}]})
    env.create("corpora", "second-life", {"description": "d", "sources": [{"inline": "The new facts."}]})
    env.create("cartridges", "reborn", cartridge_spec("first-life"))
    env.wait_condition("cartridges", "reborn", "Ready", "True")
    env.custom.delete_namespaced_custom_object(api.GROUP, api.VERSION, env.namespace, "cartridges", "reborn")
    wait_for("cartridge deleted", lambda: env.get("cartridges", "reborn") is None)
    env.create("cartridges", "reborn", cartridge_spec("second-life"))
    wait_for("generation 2 trained", lambda: status(env, "reborn").get("artifact", {}).get("uri", "").startswith(
        layout.generation_prefix(env.store_root, env.namespace, "reborn", 2)), 90)  # fmt: skip
    env.wait_condition("cartridges", "reborn", "Ready", "True")
    pointer = env.store.get_json(layout.current_pointer(env.store_root, env.namespace, "reborn"))
    prefix = layout.confined_pointer(env.store_root, env.namespace, "reborn", layout.Pointer(**pointer)).prefix
    manifest = env.store.get_json(f"{prefix}/manifest.json")
    assert pointer["generation"] == 2
    assert manifest["corpus_digest"] == (env.get("corpora", "second-life") or {})["status"]["digest"]


def test_a_recreated_cartridge_skips_a_generation_left_half_trained(operator_env: OperatorEnv) -> None:
    """A Cartridge deleted mid-training leaves synthesized shards and checkpoints under g1/ but no manifest; one of
    the same name applied later must not resume from them: it starts after every generation with anything stored."""
    env = operator_env
    leftovers = layout.generation_prefix(env.store_root, env.namespace, "halfway", 1)
    env.store.put_bytes(f"{leftovers}/synth/shard-00000.jsonl", b'{"old": "conversation"}\n')
    env.store.put_bytes(f"{leftovers}/checkpoint/step-100.pt", b"old weights")
    env.create("corpora", "halfway", {"description": "d", "sources": [{"inline": "Fresh facts."}]})
    env.create("cartridges", "halfway", cartridge_spec("halfway"))
    env.wait_condition("cartridges", "halfway", "Ready", "True")
    assert status(env, "halfway")["generation"] == 2 and jobs(env, "halfway") == ["halfway-g2"]
    pointer = env.store.get_json(layout.current_pointer(env.store_root, env.namespace, "halfway"))
    assert pointer["generation"] == 2

    # A status write lost after the Job was created (here: the status cleared): the Job this Cartridge owns says
    # which generation is its own, so nothing trains again under a new number.
    cleared = {k: None for k in ("generation", "trainingHash", "trainingJob", "artifact", "progress")}
    env.custom.patch_namespaced_custom_object_status(
        api.GROUP, api.VERSION, env.namespace, "cartridges", "halfway", {"status": cleared}
    )
    wait_for("generation recomputed", lambda: status(env, "halfway").get("artifact") is not None)
    assert status(env, "halfway")["generation"] == 2 and jobs(env, "halfway") == ["halfway-g2"]


def test_a_cartridge_name_longer_than_a_label_value_trains(operator_env: OperatorEnv) -> None:
    """Cartridge names may have 253 characters, label values 63: the Job's label holds a label-safe value that the
    lookups by label use as well."""
    env = operator_env
    name = "a-very-long-cartridge-name." + "x" * 80
    env.create("corpora", "longname", {"description": "d", "sources": [{"inline": "Facts with a long name."}]})
    env.create("cartridges", name, cartridge_spec("longname"))
    env.wait_condition("cartridges", name, "Ready", "True")
    [job] = jobs(env, name)
    labels = client.BatchV1Api(env.api).read_namespaced_job(job, env.namespace).metadata.labels
    assert len(labels[manifests.CARTRIDGE_LABEL]) <= 63 and job == manifests.job_name(name, 1)


def test_a_job_the_api_server_refuses_stalls_with_its_message_and_recovers(operator_env: OperatorEnv) -> None:
    """A spec the CRD admits but the Job's validation refuses (here a nodeSelector key that is no label key) puts
    the API server's message in the status, instead of failing every pass; fixing the spec trains."""
    env = operator_env
    env.create("corpora", "refused", {"description": "d", "sources": [{"inline": "Facts for a refused Job."}]})
    resources = {"gpus": 0, "nodeSelector": {"not a valid key!": "x"}}
    env.create("cartridges", "refused", cartridge_spec("refused", resources=resources))
    stalled = env.wait_condition("cartridges", "refused", "Stalled", "True")
    assert stalled["reason"] == "InvalidJob" and "nodeSelector" in stalled["message"]
    assert "refused Job refused-g1" in stalled["message"] and jobs(env, "refused") == []
    env.patch_spec("cartridges", "refused", {"resources": {"nodeSelector": {"not a valid key!": None}}})
    env.wait_condition("cartridges", "refused", "Ready", "True")
    assert jobs(env, "refused") == ["refused-g1"]


def test_a_job_that_cannot_create_its_pod_stalls_with_the_reason_and_recovers(operator_env: OperatorEnv) -> None:
    """A Job whose pod the API server refuses (a PriorityClass that does not exist) gets no condition for hours;
    the Job controller's FailedCreate Event says why, and the Cartridge shows it at once. Once the PriorityClass
    exists, the Job controller's next try creates the pod and the Cartridge trains."""
    env = operator_env
    priority = f"missing-{env.namespace}"
    env.create("corpora", "unplaced", {"description": "d", "sources": [{"inline": "Facts without a pod."}]})
    env.create(
        "cartridges", "unplaced", cartridge_spec("unplaced", resources={"gpus": 0, "priorityClassName": priority})
    )
    stalled = env.wait_condition("cartridges", "unplaced", "Stalled", "True")
    assert stalled["reason"] == "TrainingPodsNotStarting", stalled
    assert f"no PriorityClass with name {priority} was found" in stalled["message"]
    assert "training Job unplaced-g1" in stalled["message"]
    scheduling = client.SchedulingV1Api(env.api)
    scheduling.create_priority_class({"metadata": {"name": priority}, "value": 1000})
    try:
        env.wait_condition("cartridges", "unplaced", "Ready", "True", timeout_s=120)
    finally:
        scheduling.delete_priority_class(priority)


def test_a_pod_no_node_can_take_is_reported_not_stalled_and_trains_once_a_node_fits(operator_env: OperatorEnv) -> None:
    """A training pod the scheduler cannot place (here a nodeSelector no node matches; in a cluster, typically
    Insufficient nvidia.com/gpu) shows the scheduler's message instead of "Training", not stalled: a node may come
    (a cluster autoscaler's, a GPU another pod frees). Once the node fits, the pod is bound and trains."""
    env = operator_env
    core = client.CoreV1Api(env.api)
    label = f"cartridges.test/{env.namespace}"
    env.create("corpora", "unscheduled", {"description": "d", "sources": [{"inline": "Facts waiting for a node."}]})
    resources = {"gpus": 0, "nodeSelector": {label: "gpu"}}
    env.create("cartridges", "unscheduled", cartridge_spec("unscheduled", resources=resources))

    def reported() -> dict[str, Any] | None:
        ready = env.condition("cartridges", "unscheduled", "Ready") or {}
        return ready if ready.get("reason") == "TrainingPodsNotStarting" else None

    waiting = wait_for("the scheduler's message", reported)
    assert "training pod unscheduled-g1-" in waiting["message"], waiting
    assert "waits for a node: 0/1 nodes are available: 1 node(s) didn't match" in waiting["message"], waiting
    assert (env.condition("cartridges", "unscheduled", "Stalled") or {}).get("status") == "False"
    core.patch_node(env.harness.node_name, {"metadata": {"labels": {label: "gpu"}}})
    try:
        env.wait_condition("cartridges", "unscheduled", "Ready", "True", timeout_s=120)
    finally:
        core.patch_node(env.harness.node_name, {"metadata": {"labels": {label: None}}})


def test_a_failed_generation_stays_as_it_is_leaves_serving_when_asked_and_its_job_goes_once_fixed(
    operator_env: OperatorEnv,
) -> None:
    """Generation 2 fails: the status stays unwritten pass after pass (its failure's time is the Job controller's),
    disabling serving meanwhile leaves the serving objects that generation 1 holds, and once a fixed corpus moves
    the Cartridge on to generation 3, generation 2's failed Job (kept for its logs) goes."""
    env = operator_env
    apps, batch = client.AppsV1Api(env.api), client.BatchV1Api(env.api)
    env.create("corpora", "mended", {"description": "d", "sources": [{"inline": "Good facts."}]})
    env.create("cartridges", "mended", cartridge_spec("mended", serving={"enabled": True, "replicas": 0}))
    env.wait_condition("cartridges", "mended", "Ready", "True")
    env.patch_spec("corpora", "mended", {"sources": [{"inline": "PERMANENT-FAILURE"}]})
    stalled = env.wait_condition("cartridges", "mended", "Stalled", "True", timeout_s=90)
    assert stalled["reason"] == "TrainingFailed"
    failed = next(c for c in batch.read_namespaced_job("mended-g2", env.namespace).status.conditions
                  if c.type == "Failed")  # fmt: skip
    body = env.get("cartridges", "mended") or {}
    assert body["status"]["lastFailure"]["time"] == failed.last_transition_time.strftime("%Y-%m-%dT%H:%M:%SZ")
    time.sleep(12)  # two more passes of the 5 s resync, each finding the same failed Job
    assert (env.get("cartridges", "mended") or {})["metadata"]["resourceVersion"] == body["metadata"]["resourceVersion"]

    env.patch_spec("cartridges", "mended", {"serving": {"enabled": False}})
    wait_for("serving left", lambda: status(env, "mended").get("endpoint") is None)
    serving = f"metadata.name={manifests.serving_name('tiny')}"
    assert apps.list_namespaced_deployment(env.namespace, field_selector=serving).items == []
    assert (env.condition("cartridges", "mended", "Stalled") or {}).get("reason") == "TrainingFailed"

    env.patch_spec("corpora", "mended", {"sources": [{"inline": "Mended facts."}]})
    wait_for("generation 3 promoted", lambda: (status(env, "mended").get("promoted") or {}).get("generation") == 3, 60)
    wait_for("generation 2's failed Job gone", lambda: jobs(env, "mended") == ["mended-g1", "mended-g3"])


def test_a_new_generation_cancels_the_unfinished_job_of_the_one_it_supersedes(operator_env: OperatorEnv) -> None:
    """A training input changes while generation 1 still trains: generation 2's Job starts and generation 1's is
    deleted, so one Cartridge never runs two training Jobs; what generation 1 wrote stays in the store."""
    env = operator_env
    env.create("corpora", "retrain", {"description": "d", "sources": [{"inline": "SLOW-TRAINING facts."}]})
    env.create("cartridges", "retrain", cartridge_spec("retrain"))
    first = layout.generation_prefix(env.store_root, env.namespace, "retrain", 1)
    wait_for("generation 1 training", lambda: env.store.exists(f"{first}/{layout.PROGRESS_FILE}"), 60)
    env.patch_spec("corpora", "retrain", {"sources": [{"inline": "Quick facts."}]})
    wait_for("generation 2 started", lambda: "retrain-g2" in jobs(env, "retrain"))
    wait_for("generation 1's Job deleted", lambda: jobs(env, "retrain") == ["retrain-g2"])
    wait_for("its pod gone", lambda: not client.CoreV1Api(env.api).list_namespaced_pod(
        env.namespace, label_selector="job-name=retrain-g1").items)  # fmt: skip
    env.wait_condition("cartridges", "retrain", "Ready", "True")
    assert status(env, "retrain")["generation"] == 2
    assert env.store.exists(f"{first}/{layout.PROGRESS_FILE}")  # its artifacts stay (keepGenerations unset)


def test_nan_from_a_diverged_trainer_is_reported_and_never_promoted(operator_env: OperatorEnv) -> None:
    """A NaN loss in progress.json (JSON the API server refuses in a status) is reported as unusable while the
    status keeps updating; NaN scores in eval.json are no evaluation, so the quality gate holds the artifact back."""
    env = operator_env
    env.create("corpora", "diverged", {"description": "d", "sources": [{"inline": "NAN-SCORES facts."}]})
    gate = {"enabled": False, "qualityGate": {"minIclGainRecovered": 0.5}}
    env.create("cartridges", "diverged", cartridge_spec("diverged", serving=gate))
    wait_for("the NaN progress reported", lambda: "is unusable" in (env.condition(
        "cartridges", "diverged", "Trained") or {}).get("message", ""), 60)  # fmt: skip
    trained = env.condition("cartridges", "diverged", "Trained") or {}
    assert "finite number" in trained["message"] and status(env, "diverged").get("progress") is None
    prefix = layout.generation_prefix(env.store_root, env.namespace, "diverged", 1)
    env.store.put_json(f"{prefix}/{RELEASE_FILE}", {})
    stalled = env.wait_condition("cartridges", "diverged", "Stalled", "True")
    assert stalled["reason"] == "QualityGateFailed", stalled
    evaluated = env.condition("cartridges", "diverged", "Evaluated") or {}
    assert evaluated["reason"] == "NoEvaluation" and "finite number" in evaluated["message"]
    pointer = layout.current_pointer(env.store_root, env.namespace, "diverged")
    assert status(env, "diverged").get("evaluation") is None and not env.store.exists(pointer)
    assert "no generation is promoted yet" in stalled["message"] and "promoted" not in status(env, "diverged")


def test_a_held_back_generation_leaves_the_promoted_one_in_the_status_until_the_gate_lets_it_pass(
    operator_env: OperatorEnv,
) -> None:
    """Generation 2 scores below the raised quality gate: status.artifact describes it (the newest verified one),
    status.promoted and the QualityGateFailed message generation 1, which current.json names and serving serves.
    Lowered, the gate lets generation 2 through, and status.promoted follows the pointer."""
    env = operator_env
    gate = {"enabled": False, "qualityGate": {"minIclGainRecovered": 0.5}}  # the fake trainer scores 0.75
    env.create("corpora", "gated", {"description": "d", "sources": [{"inline": "Fact one."}]})
    env.create("cartridges", "gated", cartridge_spec("gated", serving=gate))
    env.wait_condition("cartridges", "gated", "Ready", "True")
    first = status(env, "gated")
    assert first["promoted"] == {key: first["artifact"][key] for key in ("uri", "sha256")} | {"generation": 1}

    env.patch_spec("cartridges", "gated", {"serving": {"qualityGate": {"minIclGainRecovered": 0.9}}})
    env.patch_spec("corpora", "gated", {"sources": [{"inline": "Fact two."}]})
    wait_for("generation 2 held back", lambda: status(env, "gated").get("artifact", {}).get("uri", "").startswith(
        layout.generation_prefix(env.store_root, env.namespace, "gated", 2) + "/"), 60)  # fmt: skip
    stalled = env.wait_condition("cartridges", "gated", "Stalled", "True")
    assert stalled["reason"] == "QualityGateFailed"
    assert stalled["message"].endswith("generation 2 is not promoted; generation 1 stays promoted"), stalled
    held = status(env, "gated")
    assert held["generation"] == 2 and held["promoted"] == first["promoted"]
    pointer = env.store.get_json(layout.current_pointer(env.store_root, env.namespace, "gated"))
    assert pointer["generation"] == 1

    env.patch_spec("cartridges", "gated", {"serving": {"qualityGate": {"minIclGainRecovered": 0.5}}})
    env.wait_condition("cartridges", "gated", "Ready", "True")
    second = status(env, "gated")
    assert second["promoted"] == {key: second["artifact"][key] for key in ("uri", "sha256")} | {"generation": 2}


def test_retention_delete_stops_the_training_job_before_deleting_the_artifacts(operator_env: OperatorEnv) -> None:
    """Deleted while its trainer still writes (progress every 0.2 s here): the Job and its pod go first, then the
    prefix, so nothing reappears under it after the Cartridge is gone. That wait is progress, said once (an INFO
    line and a Normal Event), not an error logged (and, by kopf before 1.44, posted as an Error Event) per look."""
    env = operator_env
    env.create("corpora", "doomed", {"description": "d", "sources": [{"inline": "SLOW-TRAINING doomed facts."}]})
    env.create("cartridges", "doomed", cartridge_spec("doomed", retention="Delete"))
    prefix = layout.cartridge_prefix(env.store_root, env.namespace, "doomed")
    first = layout.generation_prefix(env.store_root, env.namespace, "doomed", 1)
    wait_for("generation 1 training", lambda: env.store.exists(f"{first}/{layout.PROGRESS_FILE}"), 60)
    env.custom.delete_namespaced_custom_object(api.GROUP, api.VERSION, env.namespace, "cartridges", "doomed")
    wait_for("cartridge deleted", lambda: env.get("cartridges", "doomed") is None, 60)
    pods = client.CoreV1Api(env.api).list_namespaced_pod(env.namespace, label_selector="job-name=doomed-g1")
    assert jobs(env, "doomed") == [] and pods.items == []
    time.sleep(2)  # ten of the trainer's writes, had it still been running
    assert env.store.list(prefix) == []
    log = env.operator.log_path.read_text(encoding="utf-8", errors="replace").splitlines()
    waiting = f"waiting for training Job(s) doomed-g1 to stop before deleting {prefix}"
    assert [line for line in log if "doomed-g1" in line] == [waiting]
    selector = "involvedObject.kind=Cartridge,involvedObject.name=doomed"

    def events() -> list[tuple[str, str, str]] | None:
        found = client.CoreV1Api(env.api).list_namespaced_event(env.namespace, field_selector=selector).items
        seen = [(e.type, e.reason, e.message) for e in found]
        return seen if ("Normal", "WaitingForTraining", waiting) in seen else None

    assert not [event for event in wait_for("the wait's Normal Event", events) if event[0] == "Error"]
