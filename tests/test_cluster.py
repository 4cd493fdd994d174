"""cluster/: the launcher YAML against Ray's own schema, KubeRay manifests, runtime_env, version pins."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"


def _pinned_ray() -> str:
    text = (REPO / "pyproject.toml").read_text()
    m = re.search(r'"ray\[[^\]]*\]==([0-9.*]+)"', text)
    assert m, "pyproject.toml must pin ray"
    return m.group(1)


def _matches_pin(version: str) -> bool:
    pin = _pinned_ray()
    return re.fullmatch(pin.replace(".", r"\.").replace("*", r"\d+"), version) is not None


def test_installed_ray_matches_the_pin():
    import ray

    assert _matches_pin(ray.__version__)


def test_launcher_yaml_validates_against_rays_schema():
    import jsonschema
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    cfg = yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text())
    jsonschema.validate(cfg, schema)
    # Also what the launcher checks beyond the schema.
    assert cfg["head_node_type"] in cfg["available_node_types"]
    gpu = [
        t
        for t in cfg["available_node_types"].values()
        if t["node_config"]["InstanceType"].startswith(("g", "p"))
    ]
    assert gpu and all(t["max_workers"] >= 1 for t in gpu)
    setup = " ".join(cfg["setup_commands"])
    versions = re.findall(r"ray\[[^\]]*\]==([0-9.]+)", setup)
    assert versions and all(_matches_pin(v) for v in versions), setup
    assert "torch==2.14.1" in setup and "torchvision==0.29.1" in setup
    assert any("pip install" in c and "raytumor" in c for c in cfg["setup_commands"])


def _check_cluster_spec(spec: dict, where: str) -> None:
    assert _matches_pin(spec["rayVersion"]), (
        f"{where}: rayVersion {spec['rayVersion']} != pin {_pinned_ray()}"
    )
    head = spec["headGroupSpec"]
    assert "rayStartParams" in head, where
    containers = head["template"]["spec"]["containers"]
    assert containers and all(c.get("image") and c.get("name") for c in containers), where
    groups = spec["workerGroupSpecs"]
    assert groups, where
    for g in groups:
        assert g["groupName"] and "rayStartParams" in g, where
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], where
        cs = g["template"]["spec"]["containers"]
        assert cs and all(c.get("image") and c.get("name") for c in cs), where
        assert any(int(c["resources"]["limits"].get("nvidia.com/gpu", 0)) >= 1 for c in cs), (
            f"{where}: no GPU"
        )
        for c in cs:  # the image tag names the Ray it was built on (cluster/Dockerfile)
            m = re.search(r"ray(\d+\.\d+\.\d+)", c["image"])
            assert m and _matches_pin(m.group(1)), c["image"]


def test_kuberay_raycluster():
    doc = yaml.safe_load((CLUSTER / "kuberay-raycluster.yaml").read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayCluster"
    assert doc["metadata"]["name"]
    _check_cluster_spec(doc["spec"], "RayCluster")


def test_kuberay_rayjob_runs_tune_with_s3_storage():
    doc = yaml.safe_load((CLUSTER / "kuberay-rayjob-tune.yaml").read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
    spec = doc["spec"]
    assert "jobs/tune.py" in spec["entrypoint"]
    assert re.search(r"--storage-path\s+s3://", spec["entrypoint"])
    yaml.safe_load(spec["runtimeEnvYAML"])
    _check_cluster_spec(spec["rayClusterSpec"], "RayJob")
    # The entrypoint's flags are real flags of jobs/tune.py.
    from raytumor.tune import get_args_parser

    argv = spec["entrypoint"].split()[2:]
    get_args_parser().parse_args(argv)


def test_runtime_env_is_valid_and_ships_the_package():
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    RuntimeEnv(**env)  # raises on unknown or malformed fields
    assert any(Path(m).name == "raytumor" and (REPO / m).is_dir() for m in env["py_modules"])
    assert ".venv" in env["excludes"]


def test_dockerfile_uses_pinned_versions():
    text = (CLUSTER / "Dockerfile").read_text()
    m = re.search(r"FROM rayproject/ray:([0-9.]+)", text)
    assert m and _matches_pin(m.group(1))
    assert "torch==2.14.1" in text and "torchvision==0.29.1" in text
