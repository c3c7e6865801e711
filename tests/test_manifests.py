"""The Kubernetes manifests (k8s/) and the container image recipe (Dockerfile), checked offline.

No cluster and no Docker engine run here (notes/stack.md §5), so nothing is applied and the image
is not built. Instead: every manifest validates strictly against a pinned Kubernetes version's
schemas (kubernetes-validate), and cross-checks catch what schemas cannot — selectors that match
no pod, ports that disagree with the settings, env var names the code never reads, GPUs on the
wrong role, an image name the Dockerfile does not build, paths and modules the Dockerfile names
that do not exist. Each check is a function returning a list of problems, so the last tests can
show that a deliberately broken manifest fails it.
"""

from __future__ import annotations

import ast
import copy
import fnmatch
import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
DOCKERFILE = ROOT / "Dockerfile"
KUBERNETES_VERSION = "1.33.0"  # kubernetes-validate 1.37.0 ships schemas for 1.25.0 ... 1.37.0
SOURCE_PACKAGES = ("speculum", "orchestrator", "vision_encoder", "verify_service", "draft_service")
GPU = "nvidia.com/gpu"
METRICS_PORT = 9100  # Prometheus exporters: annotated now, added by the metrics change (issue 6)

# Deployment name -> (settings prefix, grpc.health.v1 service name, GPU pool or None).
INTERNAL = {
    "vision-encoder": ("ENCODER", "speculum.v1.VisionEncoder", None),
    "verify": ("VERIFY", "speculum.v1.Verifier", "large"),
    "draft": ("DRAFT", "speculum.v1.Drafter", "small"),
}
ORCHESTRATOR = "orchestrator"
SPECULUM_ROLES = {*INTERNAL, ORCHESTRATOR}
THIRD_PARTY_IMAGES = ("redis:", "jaegertracing/")


# --- loading -------------------------------------------------------------------------------------


def load_docs(folder: Path = K8S) -> list[tuple[str, dict]]:
    """(file name, document) for every YAML document in folder (not recursive: like kubectl -f)."""
    docs = []
    for path in sorted(folder.glob("*.yaml")):
        docs.extend((path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc)
    return docs


DOCS = load_docs()


def of_kind(docs, kind: str) -> list[dict]:
    return [doc for _, doc in docs if doc["kind"] == kind]


def config_data(docs) -> dict[str, str]:
    (configmap,) = of_kind(docs, "ConfigMap")
    return configmap["data"]


def pod_spec(deployment: dict) -> dict:
    return deployment["spec"]["template"]["spec"]


def containers(deployment: dict) -> list[dict]:
    return pod_spec(deployment)["containers"]


def container_ports(deployment: dict) -> dict[str, int]:
    return {p.get("name", str(p["containerPort"])): p["containerPort"] for c in containers(deployment) for p in c.get("ports", [])}


def resolve_port(deployment: dict, port: int | str) -> int | None:
    """A named or numbered port -> the container port number, None when no container declares it."""
    ports = container_ports(deployment)
    if isinstance(port, str):
        return ports.get(port)
    return port if port in ports.values() else None


def selects(selector: dict, labels: dict) -> bool:
    """Label-selector semantics (matchLabels and the In/NotIn/Exists/DoesNotExist expressions)."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        ok = {
            "In": labels.get(key) in values,
            "NotIn": labels.get(key) not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


def pod_labels(deployment: dict) -> dict:
    return deployment["spec"]["template"]["metadata"]["labels"]


def is_speculum(container: dict) -> bool:
    """A container of our image (the image test checks that every other image is a pinned third party)."""
    return not container["image"].startswith(THIRD_PARTY_IMAGES)


# --- what the code reads -------------------------------------------------------------------------


def _template_of(node: ast.JoinedStr) -> tuple[str, str] | None:
    """f"SPECULUM_{prefix}_PORT" -> ("SPECULUM_", "_PORT")."""
    parts = node.values
    if len(parts) == 3 and isinstance(parts[0], ast.Constant) and isinstance(parts[2], ast.Constant):
        head, tail = parts[0].value, parts[2].value
        if head == "SPECULUM_" and re.fullmatch(r"_[A-Z0-9_]+", tail):
            return head, tail
    return None


def env_names_read_by_code() -> set[str]:
    """SPECULUM_* names the Python sources read: exact string literals, plus f-string templates
    (f"SPECULUM_{prefix}_X" inside Class.method) expanded with the literal prefixes that
    Class.method is called with anywhere (ServerSettings.from_env("VERIFY", ...)). Docstrings
    that merely mention a name do not count."""
    literals: set[str] = set()
    templates: dict[tuple[str | None, str], set[str]] = {}
    prefixes: dict[tuple[str | None, str], set[str]] = {}
    for package in SOURCE_PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            tree = ast.parse(path.read_text(), filename=str(path))
            for scope, func, node in _walk_with_scope(tree):
                if isinstance(node, ast.Constant) and isinstance(node.value, str):
                    if re.fullmatch(r"SPECULUM_[A-Z0-9_]+", node.value):
                        literals.add(node.value)
                elif isinstance(node, ast.JoinedStr) and func and (template := _template_of(node)):
                    templates.setdefault((scope, func), set()).add(template[1])
                elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
                    key = _call_key(node.func)
                    if key and isinstance(node.args[0].value, str):
                        prefixes.setdefault(key, set()).add(node.args[0].value)
    for key, tails in templates.items():
        for prefix in prefixes.get(key, ()):
            literals.update(f"SPECULUM_{prefix}{tail}" for tail in tails)
    return literals


def _call_key(func: ast.expr) -> tuple[str | None, str] | None:
    if isinstance(func, ast.Name):
        return None, func.id
    if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
        return func.value.id, func.attr
    return None


def _walk_with_scope(tree: ast.AST):
    """Yield (enclosing class name, enclosing function name, node) for every node."""

    def visit(node, scope, func):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                yield from visit(child, child.name, None)
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield from visit(child, scope, child.name)
            else:
                yield scope, func, child
                yield from visit(child, scope, func)

    yield from visit(tree, None, None)


def otel_sdk_env_names() -> set[str]:
    """The standard OTEL_* variables the OpenTelemetry SDK reads (its own constants module)."""
    from opentelemetry.sdk import environment_variables

    return {v for v in vars(environment_variables).values() if isinstance(v, str) and v.startswith("OTEL_")}


def proto_services() -> set[str]:
    """Fully qualified gRPC service names declared in protos/."""
    names = set()
    for proto in (ROOT / "protos").rglob("*.proto"):
        text = proto.read_text()
        package = re.search(r"^package\s+([\w.]+);", text, re.M).group(1)
        names.update(f"{package}.{name}" for name in re.findall(r"^service\s+(\w+)", text, re.M))
    return names


def module_file(module: str) -> Path | None:
    """Where `python -m module` would find the module in this repo (None: nowhere)."""
    base = ROOT.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__main__.py"):
        if candidate.exists():
            return candidate
    return None


# --- the Dockerfile ------------------------------------------------------------------------------


def dockerfile_image_name() -> str:
    match = re.search(r'io\.speculum\.image="([^"]+)"', DOCKERFILE.read_text())
    assert match, "the Dockerfile must carry LABEL io.speculum.image=\"NAME:TAG\""
    return match.group(1)


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


# --- checks (each returns problems; empty is good) ------------------------------------------------


def check_service_selectors(docs) -> list[str]:
    problems = []
    deployments = of_kind(docs, "Deployment")
    for service in of_kind(docs, "Service"):
        name, selector = service["metadata"]["name"], service["spec"].get("selector", {})
        matched = [d for d in deployments if selector and selects({"matchLabels": selector}, pod_labels(d))]
        if len(matched) != 1:
            problems.append(f"Service {name} selects {len(matched)} Deployments, expected exactly 1")
            continue
        for port in service["spec"]["ports"]:
            if resolve_port(matched[0], port.get("targetPort", port["port"])) is None:
                problems.append(f"Service {name} targetPort {port.get('targetPort')} is no container port")
    return problems


def check_env_names(docs, code_names: set[str], sdk_names: set[str]) -> list[str]:
    """Every variable set for a Speculum container is read by the code (or the OTel SDK), or is
    consumed by the manifest itself as $(NAME) in a command; every $(NAME) is defined."""
    problems = []
    data = config_data(docs)
    referenced = set()
    for deployment in of_kind(docs, "Deployment"):
        for container in filter(is_speculum, containers(deployment)):
            defined = {e["name"] for e in container.get("env", [])}
            if any(src.get("configMapRef", {}).get("name") == "speculum-config" for src in container.get("envFrom", [])):
                defined |= set(data)
            for ref in re.findall(r"\$\((\w+)\)", " ".join(container.get("command", []) + container.get("args", []))):
                referenced.add(ref)
                if ref not in defined:
                    problems.append(f"{deployment['metadata']['name']}: $({ref}) is not defined for the container")
            for name in {e["name"] for e in container.get("env", [])}:
                if name not in code_names | sdk_names | referenced:
                    problems.append(f"{deployment['metadata']['name']}: env {name} is read by no code")
    for name in data:
        if name not in code_names | sdk_names | referenced:
            problems.append(f"ConfigMap key {name} is read by no code (typo?)")
    return problems


def check_ports_match_settings(docs) -> list[str]:
    problems = []
    data = config_data(docs)
    deployments = {d["metadata"]["name"]: d for d in of_kind(docs, "Deployment")}
    services = {s["metadata"]["name"]: s for s in of_kind(docs, "Service")}
    expected = {name: {"grpc": int(data[f"SPECULUM_{prefix}_PORT"])} for name, (prefix, _, _) in INTERNAL.items()}
    expected[ORCHESTRATOR] = {"grpc": int(data["SPECULUM_PUBLIC_PORT"]), "http": int(data["SPECULUM_HTTP_PORT"])}
    for name, ports in expected.items():
        if container_ports(deployments[name]) != ports:
            problems.append(f"{name}: container ports {container_ports(deployments[name])} != settings {ports}")
        service_ports = {p["name"]: p["port"] for p in services[name]["spec"]["ports"]}
        if service_ports != ports:
            problems.append(f"Service {name}: ports {service_ports} != settings {ports}")
    for prefix in ("ENCODER", "VERIFY", "DRAFT"):
        host = data[f"SPECULUM_{prefix}_HOST"]
        if host != "0.0.0.0":
            problems.append(f"SPECULUM_{prefix}_HOST={host}: a pod must listen on all interfaces")
    for key in ("SPECULUM_ENCODER_ADDRESS", "SPECULUM_VERIFY_ADDRESS", "SPECULUM_DRAFT_ADDRESS"):
        host, _, port = data[key].rpartition(":")
        service = services.get(host)
        if service is None or int(port) not in {p["port"] for p in service["spec"]["ports"]}:
            problems.append(f"{key}={data[key]} names no Service port")
    return problems


def check_probes(docs) -> list[str]:
    problems = []
    data = config_data(docs)
    for deployment in of_kind(docs, "Deployment"):
        name = deployment["metadata"]["name"]
        for container in containers(deployment):
            probes = {k: container.get(k) for k in ("startupProbe", "readinessProbe", "livenessProbe")}
            if not probes["readinessProbe"] or not probes["livenessProbe"]:
                problems.append(f"{name}: needs readiness and liveness probes")
            for kind, probe in probes.items():
                if not probe:
                    continue
                if name in INTERNAL:
                    prefix, health_name, _ = INTERNAL[name]
                    grpc = probe.get("grpc")
                    if not grpc or grpc["port"] != int(data[f"SPECULUM_{prefix}_PORT"]) or grpc.get("service") != health_name:
                        problems.append(f"{name} {kind}: want grpc probe on SPECULUM_{prefix}_PORT for {health_name}")
                elif name == ORCHESTRATOR:
                    http = probe.get("httpGet")
                    if not http or http["path"] != "/-/healthz" or resolve_port(deployment, http["port"]) != int(data["SPECULUM_HTTP_PORT"]):
                        problems.append(f"{name} {kind}: want httpGet /-/healthz on SPECULUM_HTTP_PORT")
                else:
                    for handler in ("httpGet", "tcpSocket", "grpc"):
                        if handler in probe and resolve_port(deployment, probe[handler]["port"]) is None:
                            problems.append(f"{name} {kind}: port {probe[handler]['port']} is no container port")
    return problems


def check_gpus(docs) -> list[str]:
    problems = []
    for deployment in of_kind(docs, "Deployment"):
        name = deployment["metadata"]["name"]
        pool = INTERNAL.get(name, (None, None, None))[2]
        for container in containers(deployment):
            resources = container.get("resources", {})
            has_gpu = any(GPU in resources.get(k, {}) for k in ("requests", "limits"))
            if has_gpu != (name in ("draft", "verify")):
                problems.append(f"{name}: GPU request {has_gpu}, expected only on draft and verify")
            if has_gpu and resources.get("limits", {}).get(GPU) != 1:
                problems.append(f"{name}: {GPU} must be in limits (1)")
        selector = pod_spec(deployment).get("nodeSelector", {}).get("speculum.io/gpu-pool")
        if selector != pool:
            problems.append(f"{name}: speculum.io/gpu-pool {selector!r}, expected {pool!r}")
    return problems


def check_network_policies(docs) -> list[str]:
    problems = []
    deployments = of_kind(docs, "Deployment")
    for policy in of_kind(docs, "NetworkPolicy"):
        name, spec = policy["metadata"]["name"], policy["spec"]
        targets = [d for d in deployments if selects(spec["podSelector"], pod_labels(d))]
        if not targets:
            problems.append(f"NetworkPolicy {name} selects no pod")
        for rule in spec.get("ingress", []):
            for peer in rule.get("from", []):
                if "podSelector" in peer and not any(selects(peer["podSelector"], pod_labels(d)) for d in deployments):
                    problems.append(f"NetworkPolicy {name}: a from-podSelector matches no pod")
            for port in rule.get("ports", []):
                if port["port"] != METRICS_PORT and not all(resolve_port(d, port["port"]) for d in targets):
                    problems.append(f"NetworkPolicy {name}: port {port['port']} is not a port of every selected pod")
    return problems


# --- tests ---------------------------------------------------------------------------------------


def test_installed_validator_ships_the_pinned_version():
    assert KUBERNETES_VERSION in kubernetes_validate.utils.all_versions()


@pytest.mark.parametrize(("source", "doc"), DOCS, ids=[f"{f}:{d['kind']}/{d['metadata']['name']}" for f, d in DOCS])
def test_manifest_validates_strictly(source, doc):
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_the_stack_is_complete():
    kinds = {(doc["kind"], doc["metadata"]["name"]) for _, doc in DOCS}
    for name in (*SPECULUM_ROLES, "redis", "jaeger"):
        assert ("Deployment", name) in kinds and ("Service", name) in kinds
    assert ("Namespace", "speculum") in kinds and ("PersistentVolumeClaim", "speculum-models") in kinds
    assert DOCS[0][1]["kind"] == "Namespace", "the namespace must be applied first"
    for _, doc in DOCS:
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "speculum"


def test_every_service_selects_exactly_one_deployment_and_existing_ports():
    assert check_service_selectors(DOCS) == []


def test_ports_match_the_configured_settings():
    assert check_ports_match_settings(DOCS) == []


def test_internal_services_speak_grpc():
    for service in of_kind(DOCS, "Service"):
        if service["metadata"]["name"] in SPECULUM_ROLES:
            assert service["spec"]["ports"][0]["appProtocol"] == "grpc"


def test_env_names_are_the_ones_the_code_reads():
    code_names = env_names_read_by_code()
    # The scan itself must see the names behind the f-string templates and the plain literals.
    assert {"SPECULUM_VERIFY_PORT", "SPECULUM_DRAFT_SESSION_TTL_S", "SPECULUM_REDIS_URL", "SPECULUM_TARGET_DIR"} <= code_names
    assert "SPECULUM_ENCODER_SESSION_TTL_S" not in code_names  # the encoder has no sessions
    assert check_env_names(DOCS, code_names, otel_sdk_env_names()) == []


def test_probes_use_the_right_ports_and_health_names():
    assert {health for _, health, _ in INTERNAL.values()} <= proto_services()
    assert check_probes(DOCS) == []


def test_gpus_only_on_draft_and_verify_in_their_pools():
    assert check_gpus(DOCS) == []


def test_network_policies_select_existing_pods():
    assert check_network_policies(DOCS) == []
    policies = {p["metadata"]["name"]: p["spec"] for p in of_kind(DOCS, "NetworkPolicy")}
    assert policies["default-deny-ingress"] == {"podSelector": {}, "policyTypes": ["Ingress"]}


def test_grace_period_exceeds_the_servers_grace():
    grace_s = float(config_data(DOCS)["SPECULUM_GRACE_S"])
    for deployment in of_kind(DOCS, "Deployment"):
        if deployment["metadata"]["name"] in SPECULUM_ROLES:
            assert pod_spec(deployment)["terminationGracePeriodSeconds"] > grace_s


def test_pods_run_non_root_with_a_read_only_root():
    for deployment in of_kind(DOCS, "Deployment"):
        spec = pod_spec(deployment)
        assert spec["securityContext"]["runAsNonRoot"] is True
        for container in containers(deployment):
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False
            assert context["capabilities"]["drop"] == ["ALL"]
            assert context["readOnlyRootFilesystem"] is True
            assert "resources" in container and container["resources"]["limits"]["memory"]
        if deployment["metadata"]["name"] in SPECULUM_ROLES:
            mounts = {m["mountPath"]: m["name"] for c in containers(deployment) for m in c["volumeMounts"]}
            volumes = {v["name"]: v for v in spec["volumes"]}
            assert "emptyDir" in volumes[mounts["/tmp"]]


def test_speculum_pods_carry_prometheus_scrape_annotations():
    for deployment in of_kind(DOCS, "Deployment"):
        if deployment["metadata"]["name"] in SPECULUM_ROLES:
            annotations = deployment["spec"]["template"]["metadata"]["annotations"]
            assert annotations["prometheus.io/scrape"] == "true"
            assert annotations["prometheus.io/port"] == str(METRICS_PORT)
            assert annotations["prometheus.io/path"] == "/metrics"


def test_images_are_the_one_the_dockerfile_builds():
    image = dockerfile_image_name()
    for source, doc in [*DOCS, *load_docs(K8S / "kuberay")]:
        for container in _all_containers(doc):
            if container["image"].startswith(THIRD_PARTY_IMAGES):
                tag = container["image"].rpartition(":")[2]
                assert re.fullmatch(r"[\w.-]+", tag) and tag != "latest", f"{source}: pin {container['image']}"
            else:
                assert container["image"] == image, f"{source}: {container['image']} is not {image}"
    roles = {d["metadata"]["name"] for d in of_kind(DOCS, "Deployment") if any(map(is_speculum, containers(d)))}
    assert roles == SPECULUM_ROLES


def _all_containers(doc: dict) -> list[dict]:
    found = []

    def visit(node):
        if isinstance(node, dict):
            if isinstance(node.get("containers"), list):
                found.extend(node["containers"])
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)

    visit(doc)
    return found


def test_commands_run_modules_that_exist():
    for deployment in of_kind(DOCS, "Deployment"):
        for container in filter(is_speculum, containers(deployment)):
            assert container["command"][:2] == ["python", "-m"], "the image runs each role as a module"
            module = container["command"][2]
            assert module_file(module), f"{deployment['metadata']['name']}: no module {module}"


def test_dockerfile_copies_and_runs_what_exists():
    """The image is not built here (no Docker engine); check what it names instead."""
    instructions = dockerfile_instructions()
    ignored = dockerignore_patterns()
    copied = []
    for word, args in instructions:
        if word == "COPY" and not args.startswith("--from"):
            *sources, _ = args.split()
            for source in sources:
                assert (ROOT / source).exists(), f"COPY {source}: not in the repo"
                assert not _ignored(source.rstrip("/"), ignored), f"COPY {source}: excluded by .dockerignore"
                copied.append(source.rstrip("/"))
    assert "models/demo" in copied and "protos" in copied and "pyproject.toml" in copied
    pyproject = (ROOT / "pyproject.toml").read_text()
    for pattern in re.search(r"include = \[([^\]]*)\]", pyproject).group(1).split(","):
        package = pattern.strip().strip('"').rstrip("*")
        assert package in copied, f"the image misses the package {package}"
    cmd = next(args for word, args in instructions if word == "CMD")
    assert module_file(cmd.split('"-m", "')[1].split('"')[0])
    for module in re.findall(r"python -m ([\w.]+)", DOCKERFILE.read_text()):
        if module.split(".")[0] in SOURCE_PACKAGES:  # not the standard library's (venv)
            assert module_file(module), f"Dockerfile names a module that does not exist: {module}"
    assert any(word == "USER" and not args.startswith(("root", "0")) for word, args in instructions)
    assert any(word == "RUN" and "python -m speculum.stubs" in args for word, args in instructions)
    assert re.search(r"^ARG VARIANT=cpu$", DOCKERFILE.read_text(), re.M)
    stages = {args.split(" AS ")[1] for word, args in instructions if word == "FROM"}
    assert {"torch-cpu", "torch-cuda"} <= stages


def _ignored(path: str, patterns: list[str]) -> bool:
    """True when .dockerignore drops path or one of its parents (no `!` exceptions are used)."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        if pattern.startswith("**/"):  # at any depth
            if any(fnmatch.fnmatch(part, pattern[3:]) for part in parts):
                return True
        elif any(fnmatch.fnmatch(prefix, pattern.rstrip("/")) for prefix in prefixes):
            return True
    return False


def test_dockerignore_keeps_the_build_context_small():
    ignored = dockerignore_patterns()
    for path in (".venv", ".git", "runs", "tests", "speculum/__pycache__", "speculum/v1"):
        assert _ignored(path, ignored), f".dockerignore should drop {path}"
    assert not any(p.startswith("!") for p in ignored)


def _rayservice() -> dict:
    (doc,) = [d for _, d in load_docs(K8S / "kuberay") if d["kind"] == "RayService"]
    return doc


def test_rayservice_is_structurally_sound():
    """A CRD: core schemas cannot validate it, so check its shape and what it names."""
    doc = _rayservice()
    assert doc["apiVersion"] == "ray.io/v1" and doc["metadata"]["namespace"] == "speculum"
    serve = yaml.safe_load(doc["spec"]["serveConfigV2"])
    (servicer,) = serve["grpc_options"]["grpc_servicer_functions"]
    module, _, function = servicer.rpartition(".")
    assert module == "speculum.v1.speculum_pb2_grpc" and function == "add_SpeculumServicer_to_server"
    assert "speculum.v1.Speculum" in proto_services()
    assert serve["grpc_options"]["port"] == int(config_data(DOCS)["SPECULUM_PUBLIC_PORT"])
    assert serve["http_options"]["port"] == int(config_data(DOCS)["SPECULUM_HTTP_PORT"])
    cluster = doc["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == "2.60.0"
    templates = [cluster["headGroupSpec"]["template"], *(g["template"] for g in cluster["workerGroupSpecs"])]
    for template in templates:
        assert template["metadata"]["labels"]["app.kubernetes.io/name"] == ORCHESTRATOR  # the NetworkPolicies' label
        # The pod templates are core PodTemplateSpecs: validate them as Pods.
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "ray", **template["metadata"]}, "spec": template["spec"]}
        kubernetes_validate.validate(pod, KUBERNETES_VERSION, strict=True)
        (container,) = template["spec"]["containers"]
        assert container["envFrom"] == [{"configMapRef": {"name": "speculum-config"}}]
    for _, other in load_docs(K8S / "kuberay"):
        if other["kind"] != "RayService":
            kubernetes_validate.validate(other, KUBERNETES_VERSION, strict=True)


def test_rayservice_import_path_exists():
    (app,) = yaml.safe_load(_rayservice()["spec"]["serveConfigV2"])["applications"]
    module, _, attribute = app["import_path"].partition(":")
    path = module_file(module)
    assert path, f"no module {module}"
    functions = {n.name: n for n in ast.parse(path.read_text()).body if isinstance(n, ast.FunctionDef)}
    assert attribute in functions, f"{module} defines no {attribute}"
    assert len(functions[attribute].args.args) == 1, "a Serve app builder takes exactly one argument"


# --- the checks catch broken manifests -----------------------------------------------------------


def _mutated(edit) -> list[tuple[str, dict]]:
    docs = copy.deepcopy(DOCS)
    edit(docs)
    return docs


def _deployment(docs, name: str) -> dict:
    return next(d for _, d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == name)


def test_a_misspelt_key_fails_strict_validation():
    docs = _mutated(lambda docs: containers(_deployment(docs, "verify"))[0]["ports"][0].update(protocl="TCP"))
    kubernetes_validate.validate(_deployment(docs, "verify"), KUBERNETES_VERSION, strict=False)  # why strict
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(_deployment(docs, "verify"), KUBERNETES_VERSION, strict=True)


def test_a_wrong_selector_fails_the_cross_checks():
    def edit(docs):
        service = next(d for _, d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "draft")
        service["spec"]["selector"] = {"app.kubernetes.io/name": "drafter"}
        policy = next(d for _, d in docs
                      if d["kind"] == "NetworkPolicy" and d["metadata"]["name"] == "verify-from-orchestrator-and-draft")
        policy["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/name"] = "orchestrater"

    docs = _mutated(edit)
    assert check_service_selectors(docs) == ["Service draft selects 0 Deployments, expected exactly 1"]
    assert check_network_policies(docs) == [
        "NetworkPolicy verify-from-orchestrator-and-draft: a from-podSelector matches no pod"]


def test_a_misspelt_setting_or_wrong_port_fails_the_cross_checks():
    def edit(docs):
        config_data(docs)["SPECULUM_VERIFY_MAX_SESSION"] = "8"
        config_data(docs)["SPECULUM_DRAFT_PORT"] = "50064"
        containers(_deployment(docs, "vision-encoder"))[0]["resources"]["limits"][GPU] = 1

    docs = _mutated(edit)
    env_problems = check_env_names(docs, env_names_read_by_code(), otel_sdk_env_names())
    assert env_problems == ["ConfigMap key SPECULUM_VERIFY_MAX_SESSION is read by no code (typo?)"]
    assert any("draft" in p for p in check_ports_match_settings(docs))
    assert any("draft" in p for p in check_probes(docs))
    assert check_gpus(docs) == ["vision-encoder: GPU request True, expected only on draft and verify"]
