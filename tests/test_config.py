"""Job config: YAML + --set overrides, validation messages that name the key, path resolution, to_dict."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from ray_certseg.config import ConfigError, JobConfig, apply_overrides, load_config

BASE = {
    "name": "demo",
    "output": "outputs/demo",
    "storage_options": {
        "endpoint_url": "http://127.0.0.1:9000",
        "key": "AKIAEXAMPLEKEY",
        "secret": "s3cr3t-value",
    },
    "dataset": {"kind": "manifest", "manifest": "data/val.csv", "num_classes": 6, "subset": {"count": 4}},
    "models": {
        "segmenters": {
            "clean": {"kind": "module", "factory": "pkg.mod:fn", "weights": "weights/seg.safetensors"},
            "noisy": {"kind": "torchscript", "path": "weights/missing.pt"},
        },
        "denoisers": {"ddpm": {"kind": "diffusers", "path": "weights/ddpm"}},
    },
    "methods": {
        "clean": {"segmenter": "clean"},
        "segcertify": {"segmenter": "noisy", "denoiser": None},
        "diffusion": {"segmenter": "clean", "denoiser": "ddpm"},
    },
    "sampling": {"sigmas": [0.25, 0.5], "n0": 10, "n": 100},
    "certify": {"taus": [0.75], "alphas": [0.001], "corrections": ["holm", "bonferroni"]},
    "ray": {"actors": {"min": 1, "max": 4}},
}


@pytest.fixture
def config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """configs/job.yaml next to data/ and weights/ in the config dir; the working dir is elsewhere
    and holds only weights/seg.safetensors (so that one resolves against the working dir)."""
    conf_dir, cwd = tmp_path / "project" / "configs", tmp_path / "cwd"
    for p in (
        conf_dir / "data" / "val.csv",
        conf_dir / "weights" / "seg.safetensors",
        conf_dir / "weights" / "ddpm" / "model_index.json",
        cwd / "weights" / "seg.safetensors",
    ):
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("")
    path = conf_dir / "job.yaml"
    path.write_text(yaml.safe_dump(BASE))
    monkeypatch.chdir(cwd)
    return path


def load(config_file: Path, *overrides: str) -> JobConfig:
    return load_config(config_file, list(overrides))


def test_valid_config_types_defaults_and_paths(config_file):
    cfg = load(config_file)
    conf_dir, cwd = config_file.parent, Path.cwd()
    assert cfg.name == "demo" and cfg.output == str(cwd / "outputs" / "demo")
    assert cfg.dataset.manifest == str(conf_dir / "data" / "val.csv")  # only in the config dir
    assert cfg.dataset.num_classes == 6 and cfg.dataset.ignore_index == 255 and cfg.dataset.name == "manifest"
    assert (
        cfg.dataset.subset.count == 4
        and cfg.dataset.storage_options["endpoint_url"] == "http://127.0.0.1:9000"
    )
    seg = cfg.models.segmenters
    assert seg["clean"]["weights"] == str(cwd / "weights" / "seg.safetensors")  # the working dir wins
    assert seg["clean"]["factory"] == "pkg.mod:fn"  # not a path key: untouched
    assert seg["noisy"]["path"] == "weights/missing.pt"  # exists nowhere: left as written
    assert cfg.models.denoisers["ddpm"]["path"] == str(conf_dir / "weights" / "ddpm")
    assert cfg.methods["segcertify"].denoiser is None and cfg.methods["diffusion"].denoiser == "ddpm"
    assert (
        cfg.sampling.sigmas == (0.25, 0.5) and cfg.sampling.batch_size == 16 and cfg.sampling.device == "auto"
    )
    assert cfg.certify.corrections == ("holm", "bonferroni") and cfg.ray.actors == {"min": 1, "max": 4}
    assert cfg.ray.num_gpus_per_actor == 0.0 and cfg.ray.max_tasks_in_flight_per_actor == 2


def test_to_dict_round_trip_and_redaction(config_file):
    cfg = load(config_file, "dataset.label_map={7: 255, 8: 0}")
    plain = cfg.to_dict(redact=False)
    assert JobConfig.from_dict(plain) == cfg
    assert json.loads(json.dumps(plain)) == plain  # JSON-stable: lists and string keys only
    redacted = json.dumps(cfg.to_dict())
    assert (
        "AKIAEXAMPLEKEY" not in redacted and "s3cr3t-value" not in redacted and "127.0.0.1:9000" in redacted
    )
    assert "s3cr3t-value" not in repr(cfg) and "AKIAEXAMPLEKEY" not in repr(cfg)


def test_dataset_storage_options_override_job_ones(config_file):
    cfg = load(config_file, "dataset.storage_options.endpoint_url=http://other:1")
    assert cfg.dataset.storage_options == {**BASE["storage_options"], "endpoint_url": "http://other:1"}
    assert cfg.to_dict()["dataset"]["storage_options"] == {"endpoint_url": "http://other:1"}
    assert JobConfig.from_dict(cfg.to_dict(redact=False)) == cfg


def test_overrides_nested_lists_and_new_mappings(config_file):
    cfg = load(
        config_file,
        "sampling.sigmas=[0.12, 0.5, 1.0]",
        "sampling.n=500",
        "certify.taus=0.95",
        "models.denoisers.plain.kind=identity",
        "methods.plain.segmenter=clean",
        "methods.plain.denoiser=plain",
        "dataset.subset=null",
        "ray.actors=2",
        "sampling.store_counts=true",
        "sampling.keep_host_memory=false",
    )
    assert cfg.sampling.sigmas == (0.12, 0.5, 1.0) and cfg.sampling.n == 500 and cfg.certify.taus == (0.95,)
    assert cfg.methods["plain"].denoiser == "plain" and cfg.dataset.subset is None and cfg.ray.actors == 2
    assert cfg.sampling.store_counts is True and cfg.sampling.keep_host_memory is False


def test_override_creates_mapping_under_null(config_file):
    cfg = load(config_file, "dataset.subset=null", "dataset.subset.every=3")
    assert cfg.dataset.subset.every == 3


@pytest.mark.parametrize("override", ["sampling.n0", "=3", "sampling..n=3"])
def test_malformed_override(override):
    with pytest.raises(ConfigError, match="expected KEY.SUB=VALUE"):
        apply_overrides({}, [override])


def test_override_through_a_scalar_is_an_error():
    with pytest.raises(ConfigError, match="'sampling.n0' is not a mapping"):
        apply_overrides({"sampling": {"n0": 3}}, ["sampling.n0.x=1"])


@pytest.mark.parametrize(
    "override,message",
    [
        ("sampling.n0=-3", "sampling.n0: must be an integer >= 1, got -3"),
        ("sampling.n=65536", "sampling.n: must be an integer in [1, 65535], got 65536"),
        ("sampling.n=1.5", "sampling.n: must be an integer in [1, 65535], got 1.5"),
        ("sampling.sigmas=[0.25, -1]", "sampling.sigmas[1]: must be a number > 0, got -1"),
        ("sampling.sigmas=[0.25, 0.25]", "sampling.sigmas[1]: duplicate value 0.25"),
        ("sampling.sigmas=[]", "sampling.sigmas: must be a non-empty list"),
        ("sampling.batch_size=0", "sampling.batch_size: must be an integer >= 1, got 0"),
        ("sampling.device=gpu", "sampling.device: must be auto, cpu, cuda or cuda:N, got 'gpu'"),
        ("sampling.dtype=fp8", "sampling.dtype: must be one of float32, bfloat16, float16, got 'fp8'"),
        ("sampling.compile=yes please", "sampling.compile: must be true or false"),
        ("sampling.seed=-1", "sampling.seed: must be an integer in [0,"),
        ("certify.taus=[0.5]", "certify.taus[0]: must be a number with 0.5 < tau < 1, got 0.5"),
        ("certify.taus=1", "certify.taus[0]: must be a number with 0.5 < tau < 1, got 1"),
        ("certify.alphas=[0.001, 1.0]", "certify.alphas[1]: must be a number with 0 < alpha < 1, got 1.0"),
        (
            "certify.corrections=[holm, bonf]",
            "certify.corrections[1]: must be one of holm, bonferroni, got 'bonf'",
        ),
        (
            "dataset.kind=coco",
            "dataset.kind: must be one of manifest, cityscapes, pascal_context, got 'coco'",
        ),
        ("dataset.num_classes=0", "dataset.num_classes: must be an integer in [1, 65535], got 0"),
        ("dataset.ignore_index=3", "dataset.ignore_index: must be an integer in [6, 255]"),
        ("dataset.ignore_index=300", "dataset.ignore_index: must be an integer in [6, 255]"),
        ("dataset.subset={count: 0}", "dataset.subset.count: must be an integer >= 1, got 0"),
        ("dataset.subset={count: 1, every: 2}", "dataset.subset: must be null, {count: N} or {every: m}"),
        ("dataset.resize=[480]", "dataset.resize: must be null or [height, width]"),
        ("dataset.resize=[480, 0]", "dataset.resize[1]: must be an integer >= 1, got 0"),
        ("dataset.certify_at_scale=0", "dataset.certify_at_scale: must be a number > 0, got 0"),
        ("dataset.limit=0", "dataset.limit: must be an integer >= 1, got 0"),
        ("dataset.split=../x", "dataset.split: must be a split name"),
        ("dataset.name=a/b", "dataset.name: must be a name"),
        ("dataset.class_names=[a, b]", "dataset.class_names: must be null or a list of 6 names"),
        (
            "dataset.label_map={3: 40}",
            "dataset.label_map.3: must be a class id in [0, 6) or the ignore index 255, got 40",
        ),
        ("dataset.root=/data", "dataset.root: not used by kind 'manifest'"),
        ("dataset.num_classes=null", "dataset.num_classes: required for kind 'manifest'"),
        ("ray.actors=0", "ray.actors: must be an integer >= 1 or {min: a, max: b}, got 0"),
        ("ray.actors={min: 3, max: 2}", "ray.actors.max: must be an integer >= 3, got 2"),
        ("ray.num_gpus_per_actor=-1", "ray.num_gpus_per_actor: must be a number >= 0, got -1"),
        ("methods.diffusion.segmenter=hrnet", "methods.diffusion.segmenter: unknown segmenter 'hrnet'"),
        (
            "methods.diffusion.denoiser=ddpn",
            "methods.diffusion.denoiser: unknown denoiser 'ddpn' (models.denoisers: did you mean 'ddpm'?)",
        ),
        (
            "models.segmenters.clean.kind=onnx",
            "models.segmenters.clean.kind: must be one of module, torchscript",
        ),
        ("models.denoisers.x.path=a", "models.denoisers.x.kind: required (one of identity, diffusers, adm)"),
        ("methods.bad name.segmenter=clean", "methods.bad name (the name): must be a name"),
        ("name=", "name: must be a name"),
        ("storage_options=[1]", "storage_options: must be a mapping"),
    ],
)
def test_every_validation_error_names_its_key(config_file, override, message):
    with pytest.raises(ConfigError) as info:
        load(config_file, override)
    assert str(info.value).startswith(message), str(info.value)


@pytest.mark.parametrize(
    "override,message",
    [
        ("sampling.batchsize=4", "unknown key 'sampling.batchsize' (did you mean 'batch_size'?)"),
        ("certify.tau=0.9", "unknown key 'certify.tau' (did you mean 'taus'?)"),
        ("dataset.splt=val", "unknown key 'dataset.splt' (did you mean 'split'?)"),
        ("ray.actors.maxx=3", "unknown key 'ray.actors.maxx' (did you mean 'max'?)"),
        ("method.x.segmenter=clean", "unknown key 'method' (did you mean 'methods'?)"),
        ("zzz=1", "unknown key 'zzz' (allowed: name, output"),
    ],
)
def test_unknown_keys_get_suggestions(config_file, override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load(config_file, override)


def test_cityscapes_defaults_and_missing_root(tmp_path):
    data = {**BASE, "dataset": {"kind": "cityscapes", "root": str(tmp_path)}}
    cfg = JobConfig.from_dict(data)
    assert (
        cfg.dataset.num_classes == 19
        and cfg.dataset.name == "cityscapes"
        and cfg.dataset.root == str(tmp_path)
    )
    with pytest.raises(ConfigError, match=r"^dataset.root: must be a path to the dataset folder, got None"):
        JobConfig.from_dict({**BASE, "dataset": {"kind": "pascal_context"}})


def test_missing_sections(tmp_path):
    with pytest.raises(ConfigError, match="^dataset: required"):
        JobConfig.from_dict({k: v for k, v in BASE.items() if k != "dataset"})
    with pytest.raises(ConfigError, match="^methods: at least one method"):
        JobConfig.from_dict({k: v for k, v in BASE.items() if k != "methods"})


def test_yaml_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("sampling: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_dataset_scale_renamed_with_both_meanings_explained(config_file, tmp_path):
    """dataset.scale downsampled before the noise (certificate at low resolution), unlike SegCertify's scale:
    a user's scale other than 1.0 is refused with both fixes; a run's recorded config.json is translated."""
    with pytest.raises(
        ConfigError, match=r"dataset.scale was renamed.*certify_at_scale: 0.25.*input_scale: 0.25"
    ):
        load(config_file, "dataset.scale=0.25")
    assert load(config_file, "dataset.scale=1.0").dataset.certify_at_scale == 1.0  # a no-op then and now
    assert load(config_file, "dataset.certify_at_scale=0.5").dataset.certify_at_scale == 0.5
    assert "scale" not in load(config_file).to_dict()["dataset"]
    from ray_certseg import analysis

    recorded = load(config_file).to_dict(redact=False)
    recorded["dataset"].pop("certify_at_scale")
    recorded["dataset"]["scale"] = 0.5  # as an older run wrote it
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(json.dumps(recorded))
    assert analysis.load_config(str(tmp_path / "run")).dataset.certify_at_scale == 0.5


# ----------------------------------------------------------------------------------------------- JSON Schema
REPO = Path(__file__).resolve().parent.parent


def test_json_schema_accepts_every_shipped_config_and_refuses_what_the_validator_refuses():
    """An editor checks a config with `ray-certseg schema`'s output: it must agree with the validator on the
    shipped job configs and on the common mistakes (a misspelled key, a wrong type, an unknown kind)."""
    jsonschema = pytest.importorskip("jsonschema")
    from ray_certseg.config import json_schema

    schema = json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    check = jsonschema.Draft202012Validator(schema)
    for name in ("demo.yaml", "paper_cityscapes.yaml", "paper_pascal_context.yaml"):
        data = yaml.safe_load((REPO / "configs" / name).read_text())
        assert not list(check.iter_errors(data)), name
    demo = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    for override in (
        "sampling.batchsize=4",
        "sampling.n0=-3",
        "sampling.n=1.5",
        "certify.taus=[0.5]",
        "dataset.kind=coco",
        "models.segmenters.clean.weigths=x",
        "models.segmenters.clean.kind=onnx",
        "models.denoisers.ddpm.multistep='2'",
    ):
        bad = apply_overrides(demo, [override])
        assert list(check.iter_errors(bad)), override
        with pytest.raises(ConfigError):
            JobConfig.from_dict(bad, base_dir=REPO / "configs")


def test_schema_command_prints_the_schema(tmp_path, capsys):
    from ray_certseg.cli import main

    assert main(["schema"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["title"] == "ray-certseg job config" and "dataset" in printed["required"]
    assert main(["schema", "--output", str(tmp_path / "s.json")]) == 0
    assert json.loads((tmp_path / "s.json").read_text()) == printed
