"""``python -m deploy``: render the deployment folder (``make deploy``), prove it offline (``make deploy-check``), build
the serving image here (``make image``) and run it as its Deployment says (``make image-check``).

    python -m deploy [--model digits] [--split "1.0=90 2.0=10"] [--out deploy/out] [--image ...] [--namespace ...]
    python -m deploy check [--out deploy/out]
    python -m deploy image [--model M[,M..]] [--runtime onnxruntime|torchscript] [--version V] [--explanations]
                           [--image NAME:TAG] [--compare]
    python -m deploy image-check [--model M[,M..]] [--image NAME:TAG]

This is the process where importing kserve is safe (``deploy/__init__.py``). Failures are one line on stderr, exit
status 1; ``check`` prints each validator's verdict and exits 1 when any found a problem.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import deploy

deploy.OWN_PROCESS = True

from deploy import checks, contract, render  # noqa: E402  (after OWN_PROCESS: render may import kserve here)
from deploy.plan import MAX_REPLICAS, MIN_REPLICAS, TARGET_RPS, DeployError  # noqa: E402


def render_command(args) -> int:
    options = render.Options(namespace=args.namespace, gateway_namespace=args.gateway_namespace,
                             prometheus_namespace=args.prometheus_namespace, storage_uri=args.storage_uri or "")
    if args.image:
        options.image = args.image
    out = render.render_all(Path(args.out), models=[args.model] if args.model else None, split=args.split,
                            memory_mi=args.memory, target_rps=args.target_rps, min_replicas=args.min_replicas,
                            max_replicas=args.max_replicas, use_running=not args.ignore_running, options=options)
    plans, _ = render.load_plans(out)
    for plan in plans:
        split = (f"split {json.dumps(plan.split)} from the {plan.split_source}" if plan.split else "no split")
        canary = plan.canary()
        knative = f"Knative canary {canary[0]} at {canary[1]}%" if canary else "no Knative canary"
        print(f"{plan.model}: versions {', '.join(v.version for v in plan.versions)}, default {plan.default}; "
              f"{split}; {knative}; cpu {plan.cpu} (workers × threads {plan.worker_threads} + 1), memory "
              f"{plan.memory_mi}Mi")
    print(f"rendered {out}: kubernetes/ (kubectl apply -k), kserve/, Dockerfile (image {options.image})")
    print(f"clients' keys: the pods read them from the Secret {contract.CLIENT_KEYS_SECRET} (one key per line):\n"
          f"  kubectl create secret generic {contract.CLIENT_KEYS_SECRET} -n {options.namespace} "
          f"--from-file={Path(contract.CLIENT_KEYS_FILE).name}=<file>")
    return 0


def kserve_command(args) -> int:
    """The KServe part of a render started by another process (``render.render_kserve_elsewhere``), from the plans
    and options that render recorded in the folder."""
    out = Path(args.out)
    plans, options = render.load_plans(out)
    render.render_kserve(plans, out, options)
    return 0


def check_command(args) -> int:
    from deploy import kserve

    out = Path(args.out)
    if not (out / "plans.json").exists():
        raise DeployError(f"nothing rendered in {out}: run make deploy first")
    plans, options = render.load_plans(out)
    results: dict[str, list[str]] = {}
    notes: dict[str, str] = {}

    def run(name: str, function, *call_args) -> None:
        started = time.monotonic()
        found = function(*call_args)
        if isinstance(found, dict):
            found = [problem for key, items in found.items() for problem in items]
        results[name] = found
        notes.setdefault(name, "")
        notes[name] += f" ({time.monotonic() - started:.1f} s)"

    core = checks.core_files(out / "kubernetes")
    notes["kubernetes-validate"] = (f"{len(core)} core manifests, --strict, Kubernetes "
                                    f"{', '.join(deploy.KUBERNETES_VERSIONS)}")
    run("kubernetes-validate", checks.kubernetes_validate, core)
    notes["kubernetes contract"] = "Deployment, HPA + PDB, NetworkPolicy, ServiceMonitor rules"
    run("kubernetes contract", checks.kubernetes_problems, out / "kubernetes")
    notes["kubectl kustomize"] = "renders kubernetes/, kinds and namespace as written"
    run("kubectl kustomize", checks.kustomize_problems, out / "kubernetes", options.namespace)
    kserve_objects = [(p, o) for p, o in checks.objects(out / "kserve")]
    notes["kserve admission"] = f"{len(kserve_objects)} KServe objects against KServe's admission rules"
    run("kserve admission", checks.kserve_problems, out / "kserve", plans)
    notes["kserve SDK models"] = "every field known to the kserve SDK's models, with its type"
    run("kserve SDK models", lambda: [f"{p.relative_to(out)}: {problem}" for p, o in kserve_objects
                                      for problem in kserve.sdk_problems(o)])
    promtool_lines: list[str] = []

    def promtool_all() -> list[str]:
        problems, lines = checks.promtool_problems(out / "kubernetes", plans)
        promtool_lines.extend(lines)
        return problems

    notes["promtool"] = "check rules + test rules, one unit test per alert"
    run("promtool", promtool_all)
    notes["prometheus-adapter"] = "the HPA's rate query, filled in as the adapter does, unit-tested by promtool"
    run("prometheus-adapter", checks.adapter_problems, out / "prometheus-adapter" / "rules.yaml")
    notes["hadolint + Dockerfile contract"] = "every hadolint finding fails; pins, non-root USER, tini, COPY list"
    run("hadolint + Dockerfile contract", checks.dockerfile_problems, out / "Dockerfile")
    for line in promtool_lines:
        print(f"  {line}")
    failed = 0
    for name, problems in results.items():
        verdict = "ok" if not problems else f"FAILED ({len(problems)})"
        print(f"{name}: {verdict} - {notes[name].strip()}")
        for problem in problems:
            print(f"    {problem}")
        failed += bool(problems)
    print(f"deploy check: {'all passed' if not failed else f'{failed} validator(s) failed'} on {out}")
    return 1 if failed else 0


def image_command(args) -> int:
    from deploy import build

    return build.main(args)


def image_check_command(args) -> int:
    from deploy import container

    return container.main(args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", nargs="?", default="render",
                        choices=("render", "check", "kserve", "image", "image-check"))
    parser.add_argument("--out", default=str(deploy.OUT), help="output folder (default deploy/out, replaced)")
    parser.add_argument("--model", help="only this model (default: every built model); image, image-check: a comma "
                                        "list")
    parser.add_argument("--split", help='the A/B split when no front door runs with one: "1.0=90 2.0=10"')
    parser.add_argument("--ignore-running", action="store_true", help="do not read the running front door's split")
    parser.add_argument("--image", help="the serving image (default torchserve-toolkit:<version>-torchserve<ts>)")
    parser.add_argument("--namespace", default=render.NAMESPACE)
    parser.add_argument("--gateway-namespace", default=render.GATEWAY_NAMESPACE,
                        help="namespace whose pods may call inference (8080, 8083)")
    parser.add_argument("--prometheus-namespace", default=render.PROMETHEUS_NAMESPACE,
                        help="namespace of the Prometheus pods that may scrape 8082")
    parser.add_argument("--storage-uri", help="KServe storageUri per model, {model} filled in")
    parser.add_argument("--memory", type=int, help="memory per pod in MiB (default: estimated from the archives)")
    parser.add_argument("--target-rps", type=int, default=TARGET_RPS, help="requests per second per pod to scale at")
    parser.add_argument("--min-replicas", type=int, default=MIN_REPLICAS)
    parser.add_argument("--max-replicas", type=int, default=MAX_REPLICAS)
    image = parser.add_argument_group("image", "make image and make image-check (deploy/build.py, deploy/container.py)")
    image.add_argument("--runtime", choices=("onnxruntime", "torchscript"), help="only the versions on this runtime")
    image.add_argument("--version", help="only this version of each model")
    image.add_argument("--explanations", action="store_true",
                       help="carry torch and captum for /explanations, also when every version runs on ONNX Runtime")
    image.add_argument("--compare", action="store_true",
                       help="also build the same versions with torch, and compare the sizes")
    args = parser.parse_args(argv)
    commands = {"render": render_command, "check": check_command, "kserve": kserve_command,
                "image": image_command, "image-check": image_check_command}
    try:
        return commands[args.command](args)
    except (DeployError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
