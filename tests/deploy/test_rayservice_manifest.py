"""deploy/rayservice.yaml against KubeRay v1.7.0's RayService CRD (its openAPIV3Schema, vendored
in deploy/kuberay/), and its serveConfigV2 against the project's own cluster config and loader."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from router.serve_config import app_config, load_serve_document

REPO = Path(__file__).resolve().parents[2]
MANIFEST = REPO / "deploy" / "rayservice.yaml"
CRD = REPO / "deploy" / "kuberay" / "ray.io_rayservices.yaml"


def strict(schema: Any) -> Any:
    """The schema as the API server applies it: fields it does not declare are pruned there
    (silently: a misspelt `livenesProbe` would vanish), so here they are errors."""
    if isinstance(schema, dict):
        schema = {key: strict(value) for key, value in schema.items()}
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [strict(value) for value in schema]
    return schema


@pytest.fixture(scope="module")
def validator() -> jsonschema.protocols.Validator:
    crd = yaml.load(CRD.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # 1 MB
    assert crd["spec"]["names"]["kind"] == "RayService"
    (v1,) = [version for version in crd["spec"]["versions"] if version["name"] == "v1"]
    schema = strict(v1["schema"]["openAPIV3Schema"])
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft7Validator)
    cls.check_schema(schema)
    return cls(schema)


@pytest.fixture(scope="module")
def manifest() -> dict[str, Any]:
    return yaml.safe_load(MANIFEST.read_text())


def containers(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    cluster = manifest["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    return [c for group in groups for c in group["template"]["spec"]["containers"]]


def errors(validator, document) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(document)]


def test_the_manifest_is_a_valid_rayservice(validator, manifest):
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayService"
    assert errors(validator, manifest) == []


def test_the_schema_check_catches_a_misspelt_field_and_a_wrong_type(validator, manifest):
    misspelt = copy.deepcopy(manifest)
    worker = misspelt["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    worker["livenesProbe"] = worker.pop("livenessProbe")
    assert any("livenesProbe" in e for e in errors(validator, misspelt))
    wrong_type = copy.deepcopy(manifest)
    wrong_type["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["replicas"] = "2"
    assert any("replicas" in e for e in errors(validator, wrong_type))
    no_group_name = copy.deepcopy(manifest)
    del no_group_name["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["groupName"]
    assert any("groupName" in e for e in errors(validator, no_group_name))


def test_serve_config_v2_is_the_cluster_config_and_loads_as_one(manifest, tmp_path):
    serve_config = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    assert serve_config == load_serve_document(REPO / "serve_config.cluster.yaml")
    path = tmp_path / "serve_config_v2.yaml"
    path.write_text(manifest["spec"]["serveConfigV2"])
    config = app_config(path)  # the project's own loader, as `serve deploy` and check-config read it
    assert config.state.backend == "postgres"
    # The variables the config reads are the ones every container gets from the Secret.
    wanted = {config.state.dsn_env, config.security.session.secret_env}
    for container in containers(manifest):
        from_secrets = {
            env["name"]: env["valueFrom"]["secretKeyRef"]
            for env in container.get("env", [])
            if "secretKeyRef" in env.get("valueFrom", {})
        }
        assert wanted <= set(from_secrets), container["name"]
        assert all(ref["name"] == "visionroute-secrets" for ref in from_secrets.values())
        assert not any("value" in env for env in container.get("env", []) if env["name"] in wanted)


def test_the_bind_policy_allows_the_config_and_workers_probe_its_http_port(manifest, tmp_path):
    from router.auth.keys import check_bind
    from router.serve_runner import endpoints_of

    serve_config = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    path = tmp_path / "serve_config_v2.yaml"
    path.write_text(manifest["spec"]["serveConfigV2"])
    endpoints = endpoints_of(serve_config)
    check_bind(app_config(path).security, endpoints.http_host, endpoints.grpc_port is not None)
    http_port = serve_config["http_options"]["port"]
    for group in manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
        for container in group["template"]["spec"]["containers"]:
            assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": http_port}
            assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": http_port}
            assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    head = manifest["spec"]["rayClusterConfig"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0" and manifest["spec"]["excludeHeadPodFromServeSvc"]


def test_every_container_runs_the_pinned_image_as_a_non_root_user(manifest):
    images = {c["image"] for c in containers(manifest)}
    assert len(images) == 1
    (image,) = images
    assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest")
    cluster = manifest["spec"]["rayClusterConfig"]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        context = group["template"]["spec"]["securityContext"]
        assert context["runAsNonRoot"] is True and context["runAsUser"] != 0
    locked = re.search(r"^ray==(\S+)", (REPO / "requirements" / "dev.txt").read_text(), re.MULTILINE)
    assert cluster["rayVersion"] == locked.group(1)  # the image's Ray
