"""Load a built archive as a TorchServe worker does, and answer requests with it: the build's last gate.

Run as a script in an isolated interpreter (``python -I export/worker_check.py``) over the archive extracted into a
folder: nothing of this repository or of the user's code is importable, only the archive's own files (as the worker
puts the model folder on ``sys.path``) and the installed packages. The model is loaded by TorchServe's own loader
(``ts.model_loader.TsModelLoader``: the manifest's handler, the archive's model-config.yaml), then each request is
handled as one batch, as ``ts.service.Service.predict`` does short of encoding the answer for the frontend.

stdin: ``{"model_dir": ..., "requests": [{"body": <base64>, "headers": {...}}, ...]}``;
stdout: one JSON list, per request ``{"status": 200, "content_type": ..., "body": <base64>}``. Imports nothing from
the project: ``build_mar.check_served`` runs it and compares the answers with the build's own.
"""

import base64
import json
import os
import sys


def main() -> int:
    job = json.load(sys.stdin)
    model_dir = job["model_dir"]
    sys.path.insert(0, model_dir)
    import ts
    from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl
    from ts.model_loader import ModelLoaderFactory
    from ts.service import Service

    with open(f"{model_dir}/MAR-INF/MANIFEST.json") as handle:
        manifest = json.load(handle)
    metrics = MetricsCacheYamlImpl(config_file_path=f"{os.path.dirname(ts.__file__)}/configs/metrics.yaml")
    metrics.initialize_cache()
    loader = ModelLoaderFactory.get_model_loader()
    service = loader.load(manifest["model"]["modelName"], model_dir, manifest["model"]["handler"], None, 1,
                          metrics_cache=metrics)
    answers = []
    for number, request in enumerate(job["requests"]):
        batch = [{"requestId": str(number).encode(),
                  "parameters": [{"name": "body", "contentType": request["headers"].get("content-type", ""),
                                  "value": base64.b64decode(request["body"])}],
                  "headers": [{"name": k.encode(), "value": v.encode()} for k, v in request["headers"].items()]}]
        headers, inputs, ids = Service.retrieve_data_for_inference(batch)
        context = service.context
        context.request_ids, context.request_processor, context.metrics.request_ids = ids, headers, ids
        [answer] = service._entry_point(inputs, context)
        if isinstance(answer, (bytes, bytearray)):
            body = bytes(answer)
        elif isinstance(answer, str):
            body = answer.encode()
        else:
            body = json.dumps(answer).encode()
        status, _ = context.get_response_status(0)
        answers.append({"status": status, "content_type": context.get_response_content_type(0),
                        "body": base64.b64encode(body).decode()})
    json.dump(answers, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
