"""cluster.yaml passes the Ray cluster launcher's own schema validation (what `ray up` checks first)."""

from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent


def test_cluster_yaml_validates_against_ray_launcher_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(yaml.safe_load((REPO / "cluster.yaml").read_text()))
    validate_config(config)
    assert config["head_node_type"] == "ray.head.cpu"
    assert config["available_node_types"]["ray.head.cpu"]["resources"] == {"CPU": 0}
    workers = config["available_node_types"]["ray.worker.gpu"]
    assert workers["min_workers"] == 0 < workers["max_workers"]
    assert any("pip install" in c and "ray-certseg" in c for c in config["setup_commands"])


def test_kuberay_rayjob_manifest_is_well_formed():
    job = yaml.safe_load((REPO / "deploy" / "rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert job["spec"]["entrypoint"].startswith("python jobs/certify.py")
    gpu = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    assert gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
