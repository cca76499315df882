"""README's Deploy commands, as a newcomer copies them: the model upload runs against a real MinIO, the install
commands prepare what the chart needs before it is installed, and the Secret copy drops Helm's ownership."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

import yaml
from _chart import CHART, CI_VALUES, REPO, Render, container

from cartridges.embedded import smollm2_gguf
from cartridges.store import sha256_file
from cartridges_e2e.minio import MinioServer

README = REPO / "README.md"
QUICKSTART = yaml.safe_load((CI_VALUES / "quickstart-values.yaml").read_text())


def deploy_block(heading: str = "## Deploy") -> str:
    """The first shell block under ``heading`` in the Deploy section, continuation lines joined."""
    section = README.read_text().split("\n## Deploy\n", 1)[1].split("\n## ", 1)[0]
    found = re.search(rf"^{re.escape(heading)}\n.*?^```bash\n(.*?)^```", "## Deploy\n" + section, re.M | re.S)
    assert found, f"README's Deploy section has no bash block under {heading!r}"
    return found.group(1).replace("\\\n", " ")


QUICK_START = "### Quick start: any cluster, no GPU"
PRODUCTION = "### Production: your S3 store, GPUs, watched team namespaces"
IMAGES = "### Images"


def deploy_commands(heading: str) -> list[str]:
    """A Deploy block one line each, comments left out."""
    block = deploy_block(heading)
    return [line.strip() for line in block.splitlines() if line.strip() and not line.startswith("#")]


def command_with(text: str, heading: str) -> str:
    (found,) = [c for c in deploy_commands(heading) if text in c]
    return found


def image_sets() -> dict[str, str]:
    """The chart values the README's ``IMAGES`` array sets."""
    (images,) = [c for c in deploy_commands(IMAGES) if c.startswith("IMAGES=(")]
    return dict(arg.split("=", 1) for arg in shlex.split(images[len("IMAGES=(") : -1]) if arg != "--set")


def test_model_upload_reaches_the_quickstart_store(minio_server: MinioServer) -> None:
    """The upload reads its S3 settings from the CARTRIDGES_S3_* variables the command line sets (with the quick
    start's keys), and the object lands where examples/cartridge.yaml points."""
    (upload,) = re.findall(
        r"^((?:CARTRIDGES_S3_\w+=\S+ )+)\s*\S*python -c '([^']*)'", deploy_block(QUICK_START), re.MULTILINE
    )
    settings = dict(re.findall(r"(CARTRIDGES_S3_\w+)=(\S+)", upload[0]))
    credentials = QUICKSTART["store"]["credentials"]
    assert (settings["CARTRIDGES_S3_ACCESS_KEY"], settings["CARTRIDGES_S3_SECRET_KEY"]) == (
        credentials["accessKey"],
        credentials["secretKey"],
    )
    code = upload[1]
    (uri,) = re.findall(r'"(s3://[^"]+)"', code)
    assert uri in (REPO / "examples" / "cartridge.yaml").read_text()
    minio_server.store().ensure_bucket(uri)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CARTRIDGES_S3_")}
    env = {**clean, **settings, **minio_server.env(), "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert minio_server.store().stat(uri).sha256 == sha256_file(smollm2_gguf())


def test_production_install_creates_namespaces_and_secrets_first() -> None:
    """The chart puts RoleBindings and NetworkPolicies into every watched namespace, and with existingSecret every
    pod (the operator's too) reads the store keys from that Secret in its own namespace: all must exist first."""
    commands = deploy_commands(PRODUCTION)
    install = command_with("operator.watchNamespaces=", PRODUCTION)
    (listed,) = re.findall(r"operator\.watchNamespaces=\{([^}]*)\}", install)
    (secret,) = re.findall(r"store\.credentials\.existingSecret=(\S+)", install)
    before = commands[: commands.index(install)]
    for namespace in ["cartridges-system", *listed.split(",")]:
        assert f"kubectl create namespace {namespace}" in before, namespace
        (create,) = [c for c in before if c.startswith(f"kubectl -n {namespace} create secret generic {secret} ")]
        assert "accessKey=" in create and "secretKey=" in create, create


def test_install_commands_point_the_chart_at_your_images(render: Render) -> None:
    """README says to build and push the images and point the chart at them: every install command does."""
    installs = [c for h in (QUICK_START, PRODUCTION) for c in deploy_commands(h) if c.startswith("helm install")]
    assert len(installs) == 2 and all('"${IMAGES[@]}"' in c for c in installs), installs
    sets = image_sets()
    operator = container(render("quickstart-values.yaml", sets=sets), "cartridges-operator")
    env = {e["name"]: e.get("value") for e in operator["env"]}
    assert operator["image"].startswith(sets["operator.image.repository"] + ":")
    assert env["CARTRIDGES_TRAINER_IMAGE"].startswith(sets["trainer.image.repository"] + ":")
    assert env["CARTRIDGES_SERVING_IMAGE"].startswith(sets["serving.image.repository"] + ":")


def test_images_are_built_from_the_dockerfiles_and_pushed_where_the_chart_pulls_them() -> None:
    """Each image is built from its Dockerfile, from the repository root, and pushed under the repository IMAGES
    names with the chart's appVersion, the tag the chart pulls when none is set."""
    app_version = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    commands = deploy_commands(IMAGES)
    builds = [shlex.split(c) for c in commands if c.startswith("docker build ")]
    built = {argv[argv.index("-t") + 1]: argv[argv.index("-f") + 1] for argv in builds}
    assert all(argv[-1] == "." for argv in builds), builds
    assert all((REPO / dockerfile).is_file() for dockerfile in built.values()), built
    expected = {f"{repository}:{app_version}" for repository in image_sets().values()}
    assert set(built) == expected, built
    assert {c.removeprefix("docker push ") for c in commands if c.startswith("docker push ")} == expected
    assert sorted(built.values()) == ["operator/Dockerfile", "serving-image/Dockerfile", "trainer-image/Dockerfile"]


def copy_filter(text: str) -> set[str]:
    """The fields the Secret-copy jq pipeline deletes."""
    (fields,) = re.findall(r"jq 'del\(([^)]*)\)'", text)
    return set(fields.split(","))


def test_secret_copy_drops_helms_ownership() -> None:
    """A copy keeping Helm's labels or meta.helm.sh annotations passes for a release's object; it drops them, with
    everything the API server owns, and README and NOTES.txt copy alike."""
    readme = copy_filter(command_with("jq 'del(", QUICK_START))
    assert readme == copy_filter((CHART / "templates" / "NOTES.txt").read_text())
    owned = {"uid", "resourceVersion", "creationTimestamp", "ownerReferences", "managedFields", "namespace"}
    assert {f".metadata.{field}" for field in {*owned, "labels", "annotations"}} <= readme, readme
