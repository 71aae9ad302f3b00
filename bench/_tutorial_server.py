"""The baseline of bench/serve_latency.py: the prediction handler most FastAPI + PyTorch tutorials
write. The model is loaded once; per request the upload is read, opened with PIL, put through
torchvision transforms, and run with `model(x)` in eager mode under `torch.no_grad()`.

No `from __future__ import annotations`: FastAPI reads `UploadFile` from the annotations at run
time, and tutorials do not use it either.
"""

import io

import torch
from fastapi import FastAPI, File, UploadFile
from PIL import Image
from torchvision import transforms

from trainer.saved_model import load_model


def make_app(export: str) -> FastAPI:
    model, payload = load_model(export, torch.device("cpu"))
    facts = payload["data"]
    size = facts["image_size"]
    steps = [transforms.Grayscale(1)] if facts["in_channels"] == 1 else []
    transform = transforms.Compose([*steps, transforms.Resize((size, size)), transforms.ToTensor(),
                                    transforms.Normalize(facts["mean"], facts["std"])])
    app = FastAPI()

    @app.post("/predict")
    async def predict(file: UploadFile = File(...)) -> dict:  # noqa: B008 (FastAPI's idiom)
        image = Image.open(io.BytesIO(await file.read())).convert("RGB")
        x = transform(image).unsqueeze(0)
        with torch.no_grad():
            probs = torch.softmax(model(x), dim=1)[0]
        values, indices = probs.topk(3)
        return {"predictions": [{"name": facts["classes"][i], "probability": v}
                                for v, i in zip(values.tolist(), indices.tolist(), strict=True)]}

    return app
