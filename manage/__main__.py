"""Command line over TorchServe's APIs: ``python -m manage <command>`` (``--help`` lists them).

Every failure a user can meet (server not running, no or expired token, unknown model or version, altered archive)
ends with one line on stderr and exit status 1, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

from archives import SPECS_DIR, SpecError, check_model_name, check_version, load_specs
from archives.store import Manifest
from handlers import IMAGE_TASKS
from serving import front_door, splits
from serving.instance import Instance, ServeError, wait_until
from serving.torchserve import TorchServe, minimum_workers, ready_workers


def served_entries(manifest: Manifest) -> list[dict]:
    """The manifest's versions this instance serves: all of them, or those of the models named in ``SERVE_MODELS``
    (a comma list: a Kubernetes pod serves one model of an image that carries them all)."""
    entries = manifest.entries()
    if not entries:
        raise ServeError(f"no archives in {manifest.store}: build them first with make archive")
    chosen = {m.strip() for m in os.environ.get("SERVE_MODELS", "").split(",") if m.strip()}
    if not chosen:
        return entries
    unknown = chosen - {e["model"] for e in entries}
    if unknown:
        raise ServeError(f"SERVE_MODELS names {', '.join(sorted(unknown))}, not in {manifest.store}")
    return [e for e in entries if e["model"] in chosen]


def _archive_name(manifest: Manifest, model: str, version: str, unpack: bool) -> str:
    """The name TorchServe loads a verified version by: its unpacked folder, or its archive when not ``unpack`` or
    when the store is read-only and holds no unpacked copy."""
    if unpack:
        try:
            return manifest.unpacked(model, version).name
        except PermissionError:  # a read-only store (KServe's mount) with no unpacked copy: TorchServe unpacks it
            pass
    return manifest.verify(model, version)[0].name


def archives_to_serve(args) -> None:
    """What serve.sh loads: the served versions (``served_entries``), each archive checked against its sha256 and
    served from its unpacked copy in the model store (``Manifest.unpacked``), or from the archive itself where the
    store is read-only and holds no copy, or where the configuration has a ``model_snapshot`` (KServe's storage
    layout: TorchServe loads the snapshot's archives and ignores ``--models``); TorchServe then extracts them."""
    manifest = Manifest()
    defaults = {spec.name: spec.default_version for spec in load_specs().values()}
    snapshot = "model_snapshot" in Instance.current().properties()  # KServe's layout: TorchServe loads its snapshot itself
    names = []
    # each model's default version first: TorchServe makes the first version it loads a model's default, so the
    # front door answers with the right one before apply-defaults has run
    for entry in sorted(served_entries(manifest), key=lambda e: (e["model"], e["version"] != defaults.get(e["model"]))):
        try:
            names.append(_archive_name(manifest, entry["model"], entry["version"], unpack=not snapshot))
        except ValueError as error:
            raise ServeError(str(error)) from None
    print(" ".join(names))


def _readiness(ts: TorchServe, expected: set[tuple[str, str]]) -> list[str]:
    """What is not ready yet, one line each; empty when every expected version has its minimum workers READY."""
    waiting = []
    registered = ts.registered()
    for model, version in sorted(expected):
        info = registered.get((model, version))
        if info is None:
            waiting.append(f"{model} {version}: not registered yet")
        elif ready_workers(info) < minimum_workers(info):
            states = [w["status"] for w in info.get("workers", [])]
            waiting.append(f"{model} {version}: workers {states or 'none yet'}")
    return waiting


def wait_ready(args) -> None:
    """Wait until every served archive (``served_entries``) is registered with its minimum workers READY, then set
    the specs' default versions (``apply_defaults``): one interpreter for both, on serve.sh's path to ready."""
    ts = TorchServe(timeout=5)
    expected = {(e["model"], e["version"]) for e in served_entries(Manifest())}
    deadline = time.monotonic() + args.timeout
    waiting = ["TorchServe not answering yet"]
    while time.monotonic() < deadline:
        try:
            waiting = _readiness(ts, expected)
        except ServeError as error:  # still starting: no key file or no listener yet
            waiting = [str(error)]
            if not Instance.current().alive():
                raise ServeError(f"TorchServe exited while starting: see {os.environ.get('LOG_DIR', 'logs')}/")
        if not waiting:
            return apply_defaults(args, served_only=True)
        time.sleep(0.1)
    raise ServeError(f"not ready after {args.timeout:g} s: " + "; ".join(waiting))


def apply_defaults(args, served_only: bool = False) -> None:
    """Make each spec's default_version the served default (TorchServe's own pick at start-up is not reliable).
    ``served_only`` (a start): a model whose default version this store does not hold keeps the version it serves,
    said on stderr (a store of an INT8 version alone); else that is an error."""
    ts = TorchServe()
    served = set(ts.models())
    for spec in load_specs().values():
        if spec.name in served:
            versions = {v["modelVersion"] for v in ts.versions(spec.name)}
            if spec.default_version not in versions:
                problem = (f"{spec.name}: default version {spec.default_version} from {spec.path.name} is not "
                           f"registered (registered: {', '.join(sorted(versions))})")
                if not served_only:
                    raise ServeError(problem)
                print(f"note: {problem}: {ts.default_version(spec.name)} stays the default", file=sys.stderr)
                continue
            ts.set_default(spec.name, spec.default_version)


def list_models(args) -> None:
    ts = TorchServe()
    manifest = Manifest()
    rows = []
    for model in sorted(ts.models()):
        default = ts.default_version(model)
        for info in sorted(ts.versions(model), key=lambda i: i["modelVersion"]):
            version = info["modelVersion"]
            entry = manifest.get(model, version) or {}
            ready = ready_workers(info)
            accuracy = (entry.get("accuracy") or {}).get("held_out", "-")
            rows.append((model, version, "yes" if version == default else "", f"{ready}/{info.get('minWorkers')}",
                         accuracy, entry.get("description", "")))
    print(f"{'model':<20} {'version':<8} {'default':<8} {'workers':<8} {'accuracy':>9}  description")
    for model, version, is_default, workers, accuracy, description in rows:
        print(f"{model:<20} {version:<8} {is_default:<8} {workers:<8} {accuracy:>9}  {description}")


def describe(args) -> None:
    ts = TorchServe()
    manifest = Manifest()
    described = []
    default = ts.default_version(args.model)
    for info in ts.versions(args.model):
        if args.version and info["modelVersion"] != args.version:
            continue
        entry = manifest.get(args.model, info["modelVersion"]) or {}
        info["isDefault"] = info["modelVersion"] == default
        keys = ("archive", "sha256", "size_bytes", "source", "weights", "runtime", "handler_settings", "parity",
                "preprocessing_check", "accuracy", "against_default", "quantization", "worker_check", "built_at")
        described.append({**info, "build": {k: entry.get(k) for k in keys}})
    if not described:
        raise ServeError(f"{args.model} has no registered version {args.version}")
    print(json.dumps(described, indent=2))


def built_archive(model: str, version: str) -> Path:
    """The archive of MODEL VERSION from the model store, checked against its spec and manifest entry, unpacked
    (``Manifest.unpacked``: the folder TorchServe loads without extracting)."""
    specs = load_specs()
    if model not in specs:
        raise ServeError(f"unknown model {model!r}: no spec in archives/ (known: {', '.join(sorted(specs))})")
    if version not in specs[model].versions:
        raise ServeError(f"unknown version {model} {version}: {specs[model].path.name} has "
                         f"{', '.join(specs[model].versions)}")
    manifest = Manifest()
    if manifest.get(model, version) is None:
        raise ServeError(f"{model} {version} is not built: make archive MODEL={model} VERSION={version}")
    try:
        return manifest.unpacked(model, version)
    except ValueError as error:
        raise ServeError(f"refused: {error}") from None


def register(args) -> None:
    archive = built_archive(args.model, args.version)
    print(TorchServe(timeout=300).register(archive.name))


def unregister(args) -> None:
    share = splits.share_of(args.model, args.version)
    if share > 0:
        raise ServeError(f"refused: {args.model} {args.version} still takes {share:.0%} of the front door's traffic; "
                         f"make promote or make ab MODEL={args.model} SPLIT=... without it first")
    print(TorchServe(timeout=120).unregister(args.model, args.version))


def scale(args) -> None:
    if not 0 <= args.min <= args.max:
        raise ServeError(f"need 0 <= --min <= --max, got --min {args.min} --max {args.max}")
    print(TorchServe(timeout=300).scale(args.model, args.version, args.min, args.max))


def set_default(args) -> None:
    TorchServe().set_default(args.model, args.version)
    print(f"{args.model}: default version is now {args.version}")


def ab(args) -> None:
    print(splits.set_split(args.model, front_door.parse_split(args.split)))


def apply_splits(args) -> None:
    """Each model's A/B split from a JSON file ``{"<model>": {"<version>": weight, ...}}`` (a pod's ConfigMap)."""
    try:
        wanted = json.loads(Path(args.file).read_text())
    except (OSError, ValueError) as error:
        raise ServeError(f"{args.file}: {error}") from None
    if not isinstance(wanted, dict) or not all(isinstance(s, dict) for s in wanted.values()):
        raise ServeError(f'{args.file}: expected {{"<model>": {{"<version>": weight, ...}}, ...}}')
    for model, split in wanted.items():
        check_model_name(model)
        print(splits.set_split(model, front_door.parse_split([f"{v}={w}" for v, w in split.items()])))


def promote(args) -> None:
    default = TorchServe().default_version(args.model)
    compared = Manifest().compare_accuracy(args.model, args.version, default)
    if compared and compared[1] < compared[2] and not args.force:
        name, mine, theirs = compared
        raise ServeError(f"refused: {args.model} {args.version} scores top-1 {mine:.4f} on {name}, under the default "
                         f"{default}'s {theirs:.4f}; promote it anyway with --force (make promote ... FORCE=1)")
    print(splits.promote(args.model, args.version))


def rollback(args) -> None:
    print(splits.rollback(args.model))


def routes(args) -> None:
    print(json.dumps(front_door.Proxy().serving(), indent=2))


def front_start(args) -> None:
    """Start the front door; with a TorchServe just launched, once its key file is written (the door holds the
    keys)."""
    key_file = TorchServe().key_file
    with contextlib.suppress(TimeoutError):  # the door starts either way
        wait_until(key_file.exists, args.timeout, "TorchServe's key file", 0.05)
    print(front_door.Proxy().start())


def front_stop(args) -> None:
    print(front_door.Proxy().stop())


def routes_reset(args) -> None:
    print(splits.reset())


def health_checker(args) -> None:
    from serving import health
    from serving.logs import log_to_file

    log_to_file("health")  # LOG_DIR/health.log, rotated at its size
    health.main()


def v2_gateway(args) -> None:
    from serving import v2
    from serving.logs import log_to_file

    log_to_file("v2")  # LOG_DIR/v2.log, rotated at its size; v2.main's basicConfig then does nothing
    v2.main()


def wait_front(args) -> None:
    """Wait until the front door says ready (``/health/ready``, asked of the health checker behind it), then say
    where, how long since ``--began`` (serve.sh's start, seconds since the epoch) and what it serves (``list``)."""
    import requests

    instance = Instance.current()
    deadline = time.monotonic() + args.timeout
    answer = "the health checker is not answering"
    while time.monotonic() < deadline:
        try:
            response = requests.get(f"{instance.health}/ready", timeout=2)
            if response.status_code == 200:
                since = f" in {time.time() - args.began:.1f} s" if args.began else ""
                print(f"front door ready at {instance.front}{since}", flush=True)
                return list_models(args)
            answer = "; ".join(response.json()["not_ready"])
        except (requests.RequestException, ValueError, KeyError):
            pass
        time.sleep(0.1)
    raise ServeError(f"the front door is not ready after {args.timeout:g} s: {answer}")


def token(args) -> None:
    print(TorchServe().token(args.kind))


def predict(args) -> None:
    response = TorchServe().predict(args.model, Path(args.file).read_bytes(), args.version)
    print(response.text)
    if response.status_code != 200:
        raise SystemExit(1)


def samples(args) -> None:
    """Real photos to efficientnet_lite0, held-out digits to every digits version (the top-5 of each), sentences to
    minilm, a half-size photo to super_resolution, and one explanation."""
    from export import digits, super_resolution
    from export.samples import SENTENCES, encode, photo_files

    ts = TorchServe()
    for name, payload in photo_files().items():
        answer = ts.predict("efficientnet_lite0", payload).json()
        top = ", ".join(f"{label.split(',')[0]} {p:.2f}" for label, p in answer.items())
        print(f"efficientnet_lite0  {name:<10} {top}")
    images, labels = digits.held_out()
    for info in sorted(ts.versions("digits"), key=lambda i: i["modelVersion"]):
        version = info["modelVersion"]
        for image, label in zip(images[:5], labels[:5]):
            answer = ts.predict("digits", encode(image, "PNG"), version).json()
            top = ", ".join(f"{name} {p:.2f}" for name, p in answer.items())
            print(f"digits {version:<12} label {label}   {top}")
    texts = [SENTENCES[name] for name in ("cat", "kitten", "markets")]
    vectors = ts.request("inference", "POST", "/predictions/minilm", json={"texts": texts}).json()["embeddings"]
    for name, other in (("kitten", vectors[1]), ("markets", vectors[2])):
        cosine = sum(a * b for a, b in zip(vectors[0], other))
        print(f"minilm             cosine(cat, {name}) = {cosine:.3f}")
    _, payload = super_resolution.held_out(2)["chelsea"]
    answer = ts.predict("super_resolution", payload)
    print(f"super_resolution   chelsea at half size → {answer.headers['Content-Type']} "
          f"{answer.headers['X-Output-Size']} ({len(answer.content)} bytes)")
    explanation = ts.request("inference", "POST", "/explanations/efficientnet_lite0",
                             data=photo_files()["chelsea"], headers={"Content-Type": "application/octet-stream"})
    print(f"explanation        chelsea: {explanation.json()['class']}, "
          f"{explanation.json()['grid']}x{explanation.json()['grid']} heat map")


def import_model(args) -> None:
    """Bring your own model: write its spec, build the version, register it (export/importer.py); with --quantize,
    its INT8 version too (``quantize``)."""
    from export import configure_logging

    configure_logging()
    from export.importer import Refused, Request
    from export.importer import import_model as run_import
    paths = {key: Path(getattr(args, key)) if getattr(args, key) else None for key in ("eval", "labels", "code")}
    try:
        record, new_model = run_import(Request(name=args.name, source=Path(args.source), arch=args.arch, task=args.task,
                                    args=args.args,
                                    transform=args.transform, version=args.version, runtime=args.runtime,
                                    min_accuracy=args.min_accuracy, label_order=args.label_order,
                                    allow_pickle=args.allow_pickle, **paths), specs_dir=Path(args.specs))
    except Refused as error:
        raise ServeError(str(error)) from None
    registered(args.name, record, default=new_model)  # a new model becomes its own default, a new version does not
    if args.quantize:
        args.model, args.version = args.name, record["version"]
        quantize(args)


def quantize(args) -> None:
    """A new INT8 version of MODEL's VERSION (default: its default version), gated against it on its held-out set
    (export/quantize.py), registered, not made the default."""
    from export import configure_logging
    from export.importer import Refused, quantize_version

    configure_logging()
    try:
        record = quantize_version(args.model, args.version, args.max_drop,
                                  Path(args.calibration) if args.calibration else None, Path(args.specs),
                                  min_agreement=args.min_agreement, min_cosine=args.min_cosine)
    except Refused as error:
        raise ServeError(str(error)) from None
    registered(args.model, record, default=False)


def registered(model: str, record: dict, default: bool) -> None:
    """A version just built, registered with TorchServe where it runs (made the default where ``default``), and
    its build record printed."""
    from build_mar import summary

    instance = Instance.current()
    if instance.alive():
        ts = TorchServe(instance, timeout=300)
        ts.register(Manifest().unpacked(model, record["version"]).name)
        if default:
            ts.set_default(model, record["version"])
        record["registered"] = "default" if default else "registered, not default"
    print(json.dumps(record, indent=2))
    print("\n" + summary([record]))
    if "registered" in record:
        print(f"TorchServe: {model} {record['version']} {record['registered']}")


def json_object(text: str) -> dict:
    """A JSON object from the command line (argparse names the option when this raises)."""
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    return value


def names(args) -> None:
    """The model and version a command names, checked by the one rule before anything is asked of anyone (a name
    goes into TorchServe's URLs and the front door's configuration)."""
    for key, check in (("model", check_model_name), ("name", check_model_name), ("version", check_version)):
        if getattr(args, key, None) is not None:
            check(getattr(args, key))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m manage", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, run, help: str, *positionals: str, **options) -> argparse.ArgumentParser:
        """A subcommand with positional arguments (a trailing '?' makes one optional) and --options."""
        sub = commands.add_parser(name, help=help)
        for positional in positionals:
            sub.add_argument(positional.rstrip("?"), nargs="?" if positional.endswith("?") else None)
        for option, kwargs in options.items():
            sub.add_argument(f"--{option.replace('_', '-')}", **kwargs)
        sub.set_defaults(run=run)
        return sub

    quantize_options = dict(
        max_drop={"type": float, "help": "the most the INT8 version's top-1 may drop below fp32's (default 0.01)"},
        min_agreement={"type": float, "help": "refuse where the INT8 top-1 agrees with fp32's on fewer of the inputs "
                                              "(default 0.98)"},
        min_cosine={"type": float, "help": "refuse where the mean cosine of the embeddings to fp32's is under this "
                                           "(default 0.99)"},
        calibration={"help": "a folder of inputs to calibrate static INT8 on (default: EVAL, else the samples)"},
        specs={"default": str(SPECS_DIR), "help": "the folder of specs to write into (default: archives/)"})
    command("import", import_model, "bring your own model: write archives/NAME.yaml, build the version, register it",
            "name", "source", arch={"help": "torchvision:<name>, timm:<name> or <module>:<Class> (checkpoints)"},
            args={"type": json_object, "help": "the architecture's constructor arguments as JSON, as you built it "
                                                '(e.g. {"min_size": 240})'},
            task={"choices": list(IMAGE_TASKS), "help": "what an image model does (default: from ARCH, else "
                                                        "classification)"},
            eval={"help": "held-out set: an image folder (<class>/<image>), a COCO folder (images/ + "
                          "annotations.json), images/ + masks/, a CSV of image,labels, or a CSV / JSONL of text"},
            labels={"help": "a JSON index → name map, a JSON list, or one name per line"},
            label_order={"choices": ["found"], "help": "take the label order the EVAL check finds"},
            transform={"help": "<module>:<name> of your torchvision evaluation transform"},
            code={"help": "the folder your module is in (default: the folder of FROM)"},
            version={"help": "the version to add (default: 1.0, or the next one of an existing model)"},
            runtime={"choices": ["onnxruntime", "torchscript"]},
            min_accuracy={"type": float, "help": "refuse a build whose first figure on EVAL (top-1, mAP@0.5, mean "
                                                 "IoU, macro AUROC) is under this (0..1)"},
            allow_pickle={"action": "store_true", "help": "load a pickled whole module: this runs code in the file"},
            quantize={"choices": ["int8"], "help": "add its INT8 version too (see the quantize command)"},
            **quantize_options)
    command("quantize", quantize, "add an INT8 version of MODEL's VERSION (default: its default version), refused "
            "when it drops more than --max-drop on the held-out set or strays from its answers; registered, not "
            "the default", "model", version={"help": "the fp32 version (default: the model's default version)"},
            **quantize_options)
    command("list", list_models, "registered models and versions, default, workers, accuracy")
    command("describe", describe, "TorchServe's description of a model plus its build record", "model", "version?")
    command("register", register, "register a built version (sha256 checked against the manifest)", "model", "version")
    command("unregister", unregister, "unregister a version", "model", "version")
    command("scale", scale, "set a version's minimum and maximum workers", "model", "version",
            min={"type": int, "required": True}, max={"type": int, "required": True})
    command("set-default", set_default, "make VERSION the default of MODEL", "model", "version")
    command("ab", ab, "split MODEL's traffic by weight at the front door: ab digits 1.0=90 2.0=10",
            "model").add_argument("split", nargs="+", help="VERSION=WEIGHT terms")
    command("splits", apply_splits, "(serve.sh) apply the A/B splits of a JSON file: {model: {version: weight}}",
            "file")
    command("promote", promote, "make VERSION the default and send it all of the proxy's traffic (refused when it is "
            "less accurate than the default on a set both were measured on, unless --force)", "model", "version",
            force={"action": "store_true"})
    command("rollback", rollback, "return MODEL to the default and split before the last ab or promote", "model")
    command("routes", routes, "the routing table the front door serves")
    command("routes-reset", routes_reset, "drop every A/B split (TorchServe's defaults take all the traffic again)")
    command("front-start", front_start, "(serve.sh) start the front door (nginx)",
            timeout={"type": float, "default": 60.0})
    command("front-stop", front_stop, "(serve.sh) stop the front door (in-flight requests are answered first)")
    command("wait-front", wait_front, "(serve.sh) wait until /health/ready says ready, then list what is served",
            timeout={"type": float, "default": 60.0}, began={"type": float, "help": "when the start began (epoch s)"})
    command("health", health_checker, "(serve.sh) run the health checker behind /health/live and /health/ready")
    command("v2", v2_gateway, "(serve.sh) run the Open Inference Protocol gateway (KServe v2, REST and gRPC)")
    command("token", token, "print the current key (renewed if expired)").add_argument(
        "kind", choices=["inference", "management"])
    command("predict", predict, "send a file, print the answer", "model", "file", version={})
    command("samples", samples, "send the samples to every model (photos, digits, sentences, an upscaling), print the answers")
    command("archives", archives_to_serve, "(serve.sh) the verified archives to load")
    command("wait", wait_ready, "(serve.sh) wait until every built version is READY, then set the default versions",
            timeout={"type": float, "default": 180.0})
    command("apply-defaults", apply_defaults, "(serve.sh) set each spec's default version")
    args = parser.parse_args(argv)
    try:
        names(args)
        args.run(args)
    except (ServeError, SpecError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
