"""Static checks of the cluster configs under cluster/ (Ray cluster launcher YAML, KubeRay manifests).

Pure parsing: nothing starts a cluster or talks to a cloud. Some checks also feed the parsed data
to the validators that will consume it: Ray's launcher schema (what `ray up` runs), Ray Serve's
config schema, and the Serve apps' own args parser (mmrole.serving, which rejects unknown keys).

The check that configs only reference files that exist (jobs/*.py, serve/*, configs/*) skips a
missing file outside CI, because those files are written in parallel; with CI set it fails.
"""

from __future__ import annotations

import base64
import copy
import functools
import math
import os
import random
import re
import shlex
from collections import Counter
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
LAUNCHER = CLUSTER / "aws-gpu.yaml"
KUBERAY = CLUSTER / "kuberay"

YAML_FILES = sorted(p for p in CLUSTER.rglob("*") if p.is_file() and p.suffix in (".yaml", ".yml"))
TEXT_FILES = sorted(
    p for p in CLUSTER.rglob("*") if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
)

BAD_SERVICE_TYPES = {"LoadBalancer", "NodePort"}
RAY_PORTS = {6379, 8265, 10001, 8000}  # GCS, dashboard/Jobs API, Ray Client, Serve HTTP
SECRETISH_ENV = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|API_KEY|ACCESS_KEY|CREDENTIAL", re.I)
GPU_INSTANCE = re.compile(r"^(p[2-6][a-z]*|g[3-6][a-z]*|trn\d|inf\d)\.", re.I)


def _rel(p: Path) -> str:
    return p.relative_to(REPO).as_posix()


@functools.cache
def _docs(path: Path) -> tuple:
    return tuple(d for d in yaml.safe_load_all(path.read_text()) if d is not None)


def _docs_or_empty(path: Path) -> tuple:
    """For collection-time helpers: a file that does not parse is reported by test_yaml_parses."""
    try:
        return _docs(path)
    except yaml.YAMLError:
        return ()


def _k8s_docs():
    """(path, doc) for every Kubernetes object under cluster/."""
    return [(p, d) for p in YAML_FILES for d in _docs_or_empty(p) if isinstance(d, dict) and "kind" in d]


def _kinds(kind):
    return [(p, d) for p, d in _k8s_docs() if d["kind"] == kind]


def _walk(obj, path=()):
    """Yield (path, value) for every node of a parsed YAML tree."""
    yield path, obj
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _walk(v, path + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _walk(v, path + (i,))


def _ray_cluster_specs():
    """(id, RayClusterSpec) from RayCluster, RayJob.rayClusterSpec and RayService.rayClusterConfig."""
    out = []
    for p, d in _k8s_docs():
        spec = d.get("spec") or {}
        cs = {"RayCluster": spec, "RayJob": spec.get("rayClusterSpec"), "RayService": spec.get("rayClusterConfig")}
        if d["kind"] in cs and cs[d["kind"]] is not None:
            out.append((f"{_rel(p)}:{d['kind']}/{d['metadata']['name']}", cs[d["kind"]]))
    return out


def _groups(spec):
    """(group name, group spec) for the head (name 'head') and every worker group."""
    yield "head", spec["headGroupSpec"]
    for g in spec.get("workerGroupSpecs") or []:
        yield g["groupName"], g


def _containers(group):
    return group["template"]["spec"]["containers"]


def _env(container):
    return {e["name"]: e for e in container.get("env") or []}


def _gpus(group) -> int:
    total = 0
    for c in _containers(group):
        res = c.get("resources") or {}
        total += int((res.get("limits") or {}).get("nvidia.com/gpu", 0))
    return total


def _secret_ref(env_entry):
    return ((env_entry or {}).get("valueFrom") or {}).get("secretKeyRef")


def _serve_config(doc):
    raw = doc["spec"]["serveConfigV2"]
    assert isinstance(raw, str), "serveConfigV2 must be a YAML string (a block scalar)"
    cfg = yaml.safe_load(raw)
    assert isinstance(cfg, dict) and cfg.get("applications"), "serveConfigV2 has no applications"
    return cfg


def _ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


# --------------------------------------------------------------------------------------------
# every YAML file


def test_expected_files_present():
    names = {_rel(p) for p in YAML_FILES}
    for f in (
        "cluster/aws-gpu.yaml",
        "cluster/kuberay/raycluster.yaml",
        "cluster/kuberay/rayjob.yaml",
        "cluster/kuberay/rayservice.yaml",
        "cluster/kuberay/secret.example.yaml",
    ):
        assert f in names
    assert (CLUSTER / "README.md").is_file()


@pytest.mark.parametrize("path", YAML_FILES, ids=_rel)
def test_yaml_parses(path):
    docs = _docs(path)
    assert docs, f"{_rel(path)} has no YAML documents"
    for d in docs:
        assert isinstance(d, dict), f"{_rel(path)}: every document must be a mapping"
        if "kind" in d:
            assert d.get("apiVersion") and (d.get("metadata") or {}).get("name"), d.get("kind")


# --------------------------------------------------------------------------------------------
# Ray cluster launcher


@pytest.fixture(scope="module")
def launcher():
    (cfg,) = _docs(LAUNCHER)
    return cfg


def _commands(cfg, which):
    cmds = list(cfg.get("setup_commands") or [])
    cmds += list(cfg.get(f"{which}_setup_commands") or [])
    return cmds


def _norm_home(s: str, user: str) -> str:
    return s.replace(f"/home/{user}", "~").replace("$HOME", "~").replace("${HOME}", "~")


def test_launcher_node_types(launcher):
    types = launcher["available_node_types"]
    head = types[launcher["head_node_type"]]
    assert int((head.get("resources") or {}).get("GPU", 0)) == 0, "head node should be CPU-only"
    assert not GPU_INSTANCE.match(head["node_config"]["InstanceType"]), "head instance type is a GPU type"

    gpu_types = {n: t for n, t in types.items() if int((t.get("resources") or {}).get("GPU", 0)) > 0}
    assert gpu_types, "no worker type with GPU resources"
    for name, t in gpu_types.items():
        assert name != launcher["head_node_type"]
        assert GPU_INSTANCE.match(t["node_config"]["InstanceType"]), f"{name}: not a GPU instance type"
        lo, hi = t.get("min_workers"), t.get("max_workers")
        assert isinstance(lo, int) and isinstance(hi, int), f"{name}: min_workers/max_workers must be set"
        assert 0 <= lo <= hi and hi >= 1, f"{name}: need 0 <= min_workers <= max_workers, max >= 1"
    total_max = sum(t.get("max_workers", 0) for n, t in types.items() if n != launcher["head_node_type"])
    assert launcher["max_workers"] >= total_max, "global max_workers would cap the per-type maxima"


def test_launcher_schema(launcher):
    util = pytest.importorskip("ray.autoscaler._private.util")
    # What `ray up` does before launching: fill defaults, then validate against ray-schema.json.
    util.validate_config(util.prepare_config(copy.deepcopy(launcher)))


def test_launcher_setup_installs_project(launcher):
    user = launcher["auth"]["ssh_user"]
    mounts = {_norm_home(k, user): v for k, v in launcher["file_mounts"].items()}
    project_dirs = {k.rsplit("/", 1)[0] for k, v in mounts.items() if v.rstrip("/").endswith("pyproject.toml")}
    assert project_dirs, "file_mounts must sync the project (pyproject.toml) to the nodes"
    (project_dir,) = project_dirs
    editable = re.compile(r"pip install\b[^;&|]*\s-e\s+\.(\s|$)")
    for which in ("head", "worker"):
        cmds = [_norm_home(c, user) for c in _commands(launcher, which)]
        installs = [c for c in cmds if editable.search(c)]
        assert installs, f"{which}: no `pip install -e .` in setup commands"
        assert any(f"cd {project_dir}" in c for c in installs), f"{which}: must install from {project_dir}"
        # torch comes before the project so the project's `torch` requirement is already met.
        torch_idx = [i for i, c in enumerate(cmds) if re.search(r"pip install\b.*\btorch\b", c)]
        assert torch_idx and torch_idx[0] < cmds.index(installs[0]), f"{which}: install torch before the project"
    worker_torch = [c for c in _commands(launcher, "worker") if re.search(r"pip install\b.*\btorch\b", c)]
    assert all("whl/cpu" not in c for c in worker_torch), "GPU workers need the CUDA build of torch"


def _start(launcher, which, marker):
    cmds = [c for c in launcher[f"{which}_start_ray_commands"] if marker in c]
    assert len(cmds) == 1, f"expected one `{marker}` in {which}_start_ray_commands"
    return cmds[0]


def test_launcher_head_start_dashboard_local_and_token_auth(launcher):
    head = _start(launcher, "head", "ray start --head")
    assert "--dashboard-host=127.0.0.1" in head
    assert re.search(r"\bRAY_AUTH_MODE=token\b", head)
    worker = _start(launcher, "worker", "ray start --address")
    assert re.search(r"\bRAY_AUTH_MODE=token\b", worker)
    everything = "\n".join(str(v) for _, v in _walk(launcher) if isinstance(v, str))
    hosts = set(re.findall(r"--dashboard-host[= ](\S+)", everything))
    assert hosts == {"127.0.0.1"}, f"dashboard must bind 127.0.0.1 only, found {hosts}"


def test_launcher_tokens_not_literal(launcher):
    user = launcher["auth"]["ssh_user"]
    mounted = {_norm_home(k, user) for k in launcher.get("file_mounts") or {}}
    for _, s in _walk(launcher):
        if not isinstance(s, str):
            continue
        for name, value in re.findall(r"\b(RAY_AUTH_TOKEN|MMROLE_API_TOKEN)=(\S+)", s):
            assert value.lstrip("\"'").startswith("$"), f"{name} must come from a file/env, not a literal"
        for path in re.findall(r"\bRAY_AUTH_TOKEN_PATH=(\S+)", s):
            assert _norm_home(path.strip("\"';"), user) in mounted, "RAY_AUTH_TOKEN_PATH file is not mounted"
    for which in ("head", "worker"):
        cmd = _start(launcher, which, "ray start")
        assert re.search(r"\bRAY_AUTH_TOKEN(_PATH)?=\S", cmd), f"{which}: no token source for ray start"
    for local in launcher.get("file_mounts", {}).values():
        assert not re.search(r"\.(pem|key)$", local), "private keys are not for file_mounts"


def test_launcher_no_public_ray_ports(launcher):
    for rule in (launcher["provider"].get("security_group") or {}).get("IpPermissions") or []:
        public = any(r.get("CidrIp") == "0.0.0.0/0" for r in rule.get("IpRanges", [])) or any(
            r.get("CidrIpv6") == "::/0" for r in rule.get("Ipv6Ranges", [])
        )
        if not public:
            continue
        if str(rule.get("IpProtocol")) == "-1":
            pytest.fail("security group opens all ports to the internet")
        lo, hi = rule.get("FromPort", 0), rule.get("ToPort", 65535)
        opened = {p for p in RAY_PORTS if lo <= p <= hi}
        assert not opened, f"security group opens Ray ports {opened} to the internet"


# --------------------------------------------------------------------------------------------
# KubeRay


def test_kuberay_kinds():
    kinds = Counter(d["kind"] for _, d in _k8s_docs())
    for k in ("RayCluster", "RayJob", "RayService", "Secret"):
        assert kinds[k] >= 1, f"no {k} under cluster/"
    for _, d in _k8s_docs():
        if d["kind"] in ("RayCluster", "RayJob", "RayService"):
            assert d["apiVersion"] == "ray.io/v1"


SPECS = _ray_cluster_specs()


@pytest.mark.parametrize("spec", [s for _, s in SPECS], ids=[i for i, _ in SPECS])
def test_raycluster_spec_autoscaling_gpu_groups(spec):
    assert spec.get("enableInTreeAutoscaling") is True
    assert re.fullmatch(r"2\.\d+\.\d+", str(spec["rayVersion"]))
    assert tuple(int(x) for x in str(spec["rayVersion"]).split(".")) >= (2, 52, 0), "token auth needs Ray >= 2.52"
    workers = spec.get("workerGroupSpecs") or []
    assert any(_gpus(g) >= 1 for g in workers), "no worker group with nvidia.com/gpu limits"
    assert _gpus(spec["headGroupSpec"]) == 0, "the head should not take GPUs"
    for g in workers:
        lo, hi = g.get("minReplicas"), g.get("maxReplicas")
        assert isinstance(lo, int) and isinstance(hi, int), f"{g['groupName']}: set minReplicas/maxReplicas"
        assert 0 <= lo <= hi and hi >= 1, f"{g['groupName']}: need 0 <= minReplicas <= maxReplicas"
        if "replicas" in g:
            assert lo <= g["replicas"] <= hi, f"{g['groupName']}: replicas outside [min, max]"
        for c in _containers(g):
            res = c.get("resources") or {}
            gpu_req = (res.get("requests") or {}).get("nvidia.com/gpu")
            if gpu_req is not None:
                assert str(gpu_req) == str((res.get("limits") or {}).get("nvidia.com/gpu")), "GPU requests != limits"


@pytest.mark.parametrize("spec", [s for _, s in SPECS], ids=[i for i, _ in SPECS])
def test_raycluster_spec_token_auth_from_secret(spec):
    auth = spec.get("authOptions") or {}
    assert auth.get("mode") == "token", "authOptions.mode must be token (operator + autoscaler use the token)"
    for name, group in _groups(spec):
        for c in _containers(group):
            env = _env(c)
            assert (env.get("RAY_AUTH_MODE") or {}).get("value") == "token", f"{name}/{c['name']}: RAY_AUTH_MODE"
            tok = env.get("RAY_AUTH_TOKEN")
            assert tok is not None, f"{name}/{c['name']}: RAY_AUTH_TOKEN missing"
            assert "value" not in tok, f"{name}/{c['name']}: RAY_AUTH_TOKEN must not be a literal"
            ref = _secret_ref(tok)
            assert ref and ref.get("name") and ref.get("key") == "auth_token", "RAY_AUTH_TOKEN via secretKeyRef"
            if auth.get("secretName"):
                assert ref["name"] == auth["secretName"], "pods and operator must use the same Secret"


@pytest.mark.parametrize("spec", [s for _, s in SPECS], ids=[i for i, _ in SPECS])
def test_raycluster_spec_shared_storage(spec):
    for name, group in _groups(spec):
        pod = group["template"]["spec"]
        pvc_volumes = {v["name"] for v in pod.get("volumes") or [] if "persistentVolumeClaim" in v}
        mounts = {m["mountPath"]: m["name"] for c in _containers(group) for m in c.get("volumeMounts") or []}
        assert mounts.get("/mnt/shared") in pvc_volumes, f"{name}: /mnt/shared must be a PVC mount"
    assert spec["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP"


def test_no_public_services_or_host_ports():
    for p, d in _k8s_docs():
        where = f"{_rel(p)}:{d['kind']}/{d['metadata']['name']}"
        if d["kind"] == "Service":
            assert (d.get("spec") or {}).get("type", "ClusterIP") not in BAD_SERVICE_TYPES, where
        assert d["kind"] != "Ingress", f"{where}: no Ingress in the defaults"
        for path, v in _walk(d):
            key = path[-1] if path else None
            serve_svc_type = key == "type" and "serveService" in path and path[-2] == "spec"
            if key == "serviceType" or serve_svc_type:
                assert v not in BAD_SERVICE_TYPES, f"{where}: {'.'.join(map(str, path))} = {v}"
            if key == "hostPort":
                pytest.fail(f"{where}: hostPort exposes a port on the node")
            if key == "hostNetwork":
                assert v is not True, f"{where}: hostNetwork"


def test_secretish_env_only_from_secrets():
    for p, d in _k8s_docs():
        if d["kind"] == "Secret":
            continue
        for path, v in _walk(d):
            if path and path[-1] == "env" and isinstance(v, list):
                for e in v:
                    if SECRETISH_ENV.search(e["name"]):
                        assert "value" not in e, f"{_rel(p)}: {e['name']} is a literal"
                        assert _secret_ref(e), f"{_rel(p)}: {e['name']} must use valueFrom.secretKeyRef"


def _is_placeholder(value: str) -> bool:
    return bool(re.search(r"REPLACE|CHANGE_?ME|PLACEHOLDER|EXAMPLE", value, re.I))


def test_secret_example_placeholders_and_matching_names():
    example = KUBERAY / "secret.example.yaml"
    header = example.read_text().split("apiVersion", 1)[0]
    assert re.search(r"example", header, re.I) and re.search(r"placeholder", header, re.I)
    provided = set()
    for d in _docs(example):
        assert d["kind"] == "Secret"
        for k, v in (d.get("stringData") or {}).items():
            assert _is_placeholder(str(v)), f"{d['metadata']['name']}.{k} is not a placeholder"
            provided.add((d["metadata"]["name"], k))
        for k, v in (d.get("data") or {}).items():
            assert _is_placeholder(base64.b64decode(v).decode()), f"{d['metadata']['name']}.{k}"
            provided.add((d["metadata"]["name"], k))
    # Only the example may define Secrets; everything referenced must be defined there.
    for p, _d in _kinds("Secret"):
        assert p == example, f"{_rel(p)} defines a Secret; keep real Secrets out of the repo"
    referenced = set()
    for _p, d in _k8s_docs():
        for path, v in _walk(d):
            if path and path[-1] == "secretKeyRef":
                referenced.add((v["name"], v["key"]))
    for _, spec in SPECS:
        name = (spec.get("authOptions") or {}).get("secretName")
        if name:
            referenced.add((name, "auth_token"))
    assert referenced, "no Secret references found"
    assert referenced <= provided, f"secret.example.yaml lacks {referenced - provided}"


def test_rayjob_runs_train_agent():
    jobs = _kinds("RayJob")
    assert jobs
    for _p, d in jobs:
        spec = d["spec"]
        argv = shlex.split(spec["entrypoint"])
        assert argv[:2] == ["python", "jobs/train_agent.py"], argv
        assert "--config" in argv and argv[argv.index("--config") + 1].startswith("configs/")
        kv = dict(a.split("=", 1) for a in argv if "=" in a and not a.startswith("-"))
        assert kv.get("run_name"), "the RayJob needs a run_name (resume key)"
        # The run's storage root (Ray Train storage_path): `output_dir` in mmrole.train.config.
        root = kv.get("output_dir") or kv.get("storage_path") or ""
        assert root.startswith("/mnt/shared/"), "output_dir (storage path) must be on the shared PVC"
        for key, value in kv.items():
            if key.endswith(("_dir", "_path", "prepared")):
                assert value.startswith("/mnt/shared/"), f"{key}={value}: jobs need absolute shared paths"
        assert spec.get("shutdownAfterJobFinishes") is True
        assert spec.get("rayClusterSpec") or spec.get("clusterSelector")


def _app_module(import_path: str) -> str:
    return import_path.split(":", 1)[0] if ":" in import_path else import_path.rsplit(".", 1)[0]


def _serve_configs():
    """(id, parsed Serve config): each RayService's serveConfigV2 and each plain Serve config file."""
    out = [(f"{_rel(p)}:RayService/{d['metadata']['name']}", _serve_config(d)) for p, d in _kinds("RayService")]
    for p in YAML_FILES:
        for d in _docs_or_empty(p):
            if isinstance(d, dict) and "applications" in d and "kind" not in d:
                out.append((_rel(p), d))
    return out


def test_serve_configs_found():
    ids = [i for i, _ in _serve_configs()]
    assert any(":RayService/" in i for i in ids), "no RayService serveConfigV2"
    assert "cluster/serve-apps.yaml" in ids


def test_serve_config_apps():
    expected = {"agent": ("serve.agent_app", "/agent"), "judge": ("serve.judge_app", "/judge")}
    for where_cfg, cfg in _serve_configs():
        apps = {a["name"]: a for a in cfg["applications"]}
        assert set(expected) <= set(apps), f"{where_cfg}: apps {sorted(apps)}"
        for name, (module, prefix) in expected.items():
            app = apps[name]
            assert _app_module(app["import_path"]) == module, app["import_path"]
            assert app["route_prefix"] == prefix
            args = app.get("args") or {}
            assert (args.get("model") or {}).get("model_path"), f"{name}: args.model.model_path"
            batch = (args.get("batching") or {}).get("max_batch_size")
            assert isinstance(batch, int) and batch >= 1, f"{name}: args.batching.max_batch_size"
            assert app.get("deployments"), f"{name}: no deployments"
            for dep in app["deployments"]:
                where = f"{where_cfg}: {name}/{dep.get('name')}"
                mor = dep.get("max_ongoing_requests")
                assert isinstance(mor, int) and mor >= 1, f"{where}: max_ongoing_requests"
                assert mor >= batch, f"{where}: max_ongoing_requests < batching.max_batch_size"
                asc = dep.get("autoscaling_config")
                assert asc or isinstance(dep.get("num_replicas"), int), f"{where}: num_replicas or autoscaling"
                if asc:
                    assert 0 <= asc["min_replicas"] <= asc["max_replicas"], where
                    assert 0 < asc["target_ongoing_requests"] <= mor, f"{where}: target_ongoing_requests"
                assert (dep.get("ray_actor_options") or {}).get("num_gpus") == 1, f"{where}: num_gpus"
        # No secrets smuggled into the Serve config (e.g. runtime_env.env_vars): pods/nodes set them.
        for path, _v in _walk(cfg):
            in_env = any(k in ("env_vars", "env") for k in path[:-1])
            if in_env and isinstance(path[-1], str) and SECRETISH_ENV.search(path[-1]):
                pytest.fail(f"{where_cfg} sets {'.'.join(map(str, path))}; use the node/pod environment")


def _max_gpu_demand(cfg) -> float:
    total = 0.0
    for app in cfg["applications"]:
        for dep in app.get("deployments") or []:
            asc = dep.get("autoscaling_config")
            replicas = asc["max_replicas"] if asc else dep.get("num_replicas", 1)
            total += replicas * (dep.get("ray_actor_options") or {}).get("num_gpus", 0)
    return total


def test_rayservice_capacity_and_api_token():
    services = _kinds("RayService")
    assert services
    for _p, d in services:
        spec = d["spec"]["rayClusterConfig"]
        # The worker groups can grow to the apps' maxima ...
        capacity = sum(_gpus(g) * g["maxReplicas"] for g in spec.get("workerGroupSpecs") or [])
        demand = _max_gpu_demand(_serve_config(d))
        assert capacity >= demand, f"GPU capacity {capacity} < Serve max demand {demand}"
        # ... and every container that can host a replica has the API token from a Secret.
        for gname, group in _groups(spec):
            if gname == "head" and _gpus(group) == 0:
                continue
            for c in _containers(group):
                ref = _secret_ref(_env(c).get("MMROLE_API_TOKEN"))
                assert ref and ref.get("name") and ref.get("key"), f"{gname}: MMROLE_API_TOKEN from a Secret"


def test_serve_apps_file_matches_rayservice():
    (plain,) = [cfg for i, cfg in _serve_configs() if i == "cluster/serve-apps.yaml"]
    for _, d in _kinds("RayService"):
        assert _serve_config(d)["applications"] == plain["applications"], "serve-apps.yaml drifted from RayService"
    # Outside Kubernetes the proxy stays on loopback (SSH tunnel / port-forward).
    assert (plain.get("http_options") or {}).get("host") == "127.0.0.1"


def test_serve_config_schema():
    schema = pytest.importorskip("ray.serve.schema")
    from ray.serve.config import AutoscalingConfig

    for _, cfg in _serve_configs():
        schema.ServeDeploySchema.model_validate(cfg)
        for app in cfg["applications"]:
            for dep in app.get("deployments") or []:
                if dep.get("autoscaling_config"):
                    AutoscalingConfig.model_validate(dep["autoscaling_config"])


def test_serve_args_parse_as_app_configs():
    """The apps' build_app(args) rejects unknown keys: parse args the way they do."""
    try:
        from mmrole.serving import AgentAppConfig, JudgeAppConfig
    except ImportError as e:
        if _ci():
            raise
        pytest.skip(f"mmrole.serving not importable yet ({e}); it is being written in parallel")
    parsers = {"agent": AgentAppConfig, "judge": JudgeAppConfig}
    for _, cfg in _serve_configs():
        for app in cfg["applications"]:
            if app["name"] in parsers:
                parsers[app["name"]].from_dict(app.get("args") or {})


def test_ray_versions_consistent(launcher):
    versions = {str(s["rayVersion"]) for _, s in SPECS}
    pins = {
        m
        for c in _commands(launcher, "head") + _commands(launcher, "worker")
        for m in re.findall(r"\bray\[[^\]]*\]==([\d.]+)", c)
    }
    assert pins, "launcher setup must pin the Ray version"
    dockerfile = CLUSTER / "Dockerfile"
    if dockerfile.exists():
        versions |= set(re.findall(r"rayproject/ray:([\d.]+)", dockerfile.read_text()))
    assert len(versions | pins) == 1, f"Ray versions differ: {versions | pins}"


# --------------------------------------------------------------------------------------------
# no secrets in any file under cluster/

SECRET_PATTERNS = {
    "OpenAI-style key": re.compile(r"\bsk-[A-Za-z0-9_\-]{16,}"),
    "AWS access key id": re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "GitHub token": re.compile(r"\bgh[pousr]_[A-Za-z0-9]{30,}"),
    "Hugging Face token": re.compile(r"\bhf_[A-Za-z0-9]{30,}"),
    "Slack token": re.compile(r"\bxox[abprs]-[A-Za-z0-9-]{10,}"),
    "JWT": re.compile(r"\beyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}"),
    "AWS secret assignment": re.compile(r"aws_secret_access_key\s*[:=]\s*\S{20,}", re.I),
}
CANDIDATE = re.compile(r"[A-Za-z0-9+/_\-]{32,}={0,2}")  # base64 '=' only as trailing padding
# Hex secrets (`openssl rand -hex 32`) stay under the entropy bar (4 bits/char at most); content
# digests are allowed when labelled as such (sha256:..., sha1:...).
HEX_TOKEN = re.compile(r"(?<![\w:])(?=[0-9a-fA-F]*[a-fA-F])(?=[0-9a-fA-F]*\d)[0-9a-fA-F]{32,}(?![\w])")


def _entropy(s: str) -> float:
    counts = Counter(s)
    return -sum(n / len(s) * math.log2(n / len(s)) for n in counts.values())


def find_secrets(text: str) -> list[str]:
    hits = [f"{name}: {m.group(0)[:12]}..." for name, rx in SECRET_PATTERNS.items() for m in rx.finditer(text)]
    hits += [f"long hex string: {m.group(0)[:12]}..." for m in HEX_TOKEN.finditer(text)]
    for m in CANDIDATE.finditer(text):
        tok = m.group(0)
        if "/" in tok and not re.search(r"[+=]", tok):
            continue  # a path or URL, not base64
        alnum = sum(ch.isalnum() for ch in tok)
        entropy = _entropy(tok)
        # Random base64/urlsafe tokens score ~5 bits/char; words and identifiers stay near 4.
        if (
            alnum >= 0.8 * len(tok)
            and (entropy >= 4.5 or (entropy >= 4.2 and any(ch.isdigit() for ch in tok)))
            and not _is_placeholder(tok)
        ):
            hits.append(f"high-entropy string: {tok[:12]}...")
    return hits


def test_secret_scanner_catches_fakes():
    # Generated at runtime (no secret-looking literal lives in this file), from a fixed seed so the
    # test is deterministic.
    rng = random.Random(20250101)
    raw = [rng.randbytes(32) for _ in range(20)]
    fakes = [
        "sk-" + raw[0][:24].hex(),
        "sk-proj-" + base64.urlsafe_b64encode(raw[1]).decode().rstrip("="),
        "AKIA" + "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567") for _ in range(16)),
        "ghp_" + raw[2][:18].hex(),
        "hf_" + raw[3][:17].hex(),
    ]
    for r in raw[4:]:
        fakes.append(base64.b64encode(r).decode())  # openssl rand -base64 32
        fakes.append(r.hex())  # openssl rand -hex 32
        fakes.append(base64.urlsafe_b64encode(r).decode().rstrip("="))  # secrets.token_urlsafe(32)
    for f in fakes:
        assert find_secrets(f"key: {f}\n"), f"scanner missed {f[:6]}..."
    benign = [
        "image: registry.example.com/mmrole:latest",
        "auth_token: REPLACE_ME_WITH_GENERATED_RAY_TOKEN",
        "--name /aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-22.04/latest/ami-id",
        "pip install -q torch --index-url https://download.pytorch.org/whl/cu128",
        "export RAY_AUTH_TOKEN_PATH=$HOME/.ray/auth_token",
        "judge.model.model_path=/mnt/shared/mmrole/rm-7b/final_model eval_dir=/mnt/shared/mmrole/eval",
        "image: registry.example.com/mmrole@sha256:" + raw[0].hex(),
        'kubectl create secret generic mmrole-api-token --from-literal=token="$(openssl rand -hex 32)"',
    ]
    for b in benign:
        assert not find_secrets(b), b


@pytest.mark.parametrize("path", TEXT_FILES, ids=_rel)
def test_no_secrets_in_cluster_files(path):
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        pytest.fail(f"{_rel(path)}: binary file under cluster/")
    hits = find_secrets(text)
    assert not hits, f"{_rel(path)} looks like it contains secrets: {hits}"
    assert not re.search(r"^\s*(RAY_AUTH_TOKEN|MMROLE_API_TOKEN)\s*[:=]\s*[\"']?[A-Za-z0-9+/_\-=]{16,}", text, re.M)


# --------------------------------------------------------------------------------------------
# files the configs point at (jobs/, serve/, configs/ are written in parallel)

PATH_RX = re.compile(r"(?<![\w./-])((?:jobs|serve|configs)/[\w./-]*\w\.(?:py|ya?ml|json))\b")


def _referenced_paths() -> dict[str, tuple[str, ...]]:
    """Shown name -> acceptable repo paths, for everything the cluster configs reference."""
    refs: dict[str, tuple[str, ...]] = {}

    def scan(tree):
        for path, v in _walk(tree):
            if not isinstance(v, str):
                continue
            if path and path[-1] == "serveConfigV2":
                try:
                    scan(yaml.safe_load(v))
                except yaml.YAMLError:
                    pass  # test_serve_config_apps reports it
                continue
            if path and path[-1] == "import_path":
                mod = _app_module(v).replace(".", "/")
                refs[f"{mod}.py"] = (f"{mod}.py", f"{mod}/__init__.py")
            for m in PATH_RX.findall(v):
                refs[m] = (m,)

    for p in YAML_FILES:
        for d in _docs_or_empty(p):
            scan(d)
    for launcher in _docs_or_empty(LAUNCHER) if LAUNCHER.exists() else ():
        for local in (launcher.get("file_mounts") or {}).values():
            if local.startswith("./"):
                rel = local[2:].rstrip("/")
                refs[rel] = (rel,)
    return refs


REFERENCED = _referenced_paths()


def test_referenced_paths_collected():
    for must in ("jobs/train_agent.py", "serve/agent_app.py", "serve/judge_app.py"):
        assert must in REFERENCED, f"{must} not referenced by any cluster config"


@pytest.mark.parametrize("shown", sorted(REFERENCED))
def test_referenced_path_exists(shown):
    if any((REPO / alt).exists() for alt in REFERENCED[shown]):
        return
    msg = f"{shown} is referenced under cluster/ but missing from the repository"
    if _ci():
        pytest.fail(msg)
    pytest.skip(msg + " (not in CI: it is being written in parallel)")
