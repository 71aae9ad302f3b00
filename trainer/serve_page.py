"""The prediction service's web page: one self-contained HTML document (no external scripts or
fonts, so it works on a machine without internet). The user chooses or drops an image, sees it,
and sees the top-3 classes with their probabilities as bars, or "unknown" when the top
probability is under the threshold field's value. It calls `POST /predict` like any client.
"""

from __future__ import annotations

import html
import json
from typing import Any

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>resnet-hpo: __TITLE__</title>
<style>
 body { font: 15px/1.4 system-ui, sans-serif; margin: 2em auto; max-width: 760px; color: #222; }
 h1 { font-size: 1.4em; margin-bottom: .2em; } .sub { color: #666; margin-top: 0; }
 #drop { border: 2px dashed #89a; border-radius: 8px; padding: 1.2em; text-align: center;
         background: #f6f8fa; cursor: pointer; }
 #drop.over { background: #e3ecf7; border-color: #357; }
 .row { display: flex; gap: 1.5em; margin-top: 1.2em; align-items: flex-start; }
 #preview { width: 192px; height: 192px; object-fit: contain; background: #eee;
            image-rendering: pixelated; border-radius: 4px; }
 #results { flex: 1; } .bar { background: #e8e8e8; border-radius: 3px; height: 1.3em; }
 .fill { background: #3b7dd8; height: 100%; border-radius: 3px; }
 .pred { margin-bottom: .7em; } .pred .name { font-weight: 600; }
 #verdict { font-size: 1.3em; font-weight: 700; margin-bottom: .6em; }
 #verdict.unknown { color: #b35900; } #error { color: #b00020; }
 label { margin-right: .5em; } input[type=number] { width: 5em; }
</style></head>
<body>
<h1>__TITLE__</h1>
<p class="sub">__SUBTITLE__</p>
<div id="drop">Drop an image here, or <input type="file" id="file" accept="image/*"></div>
<p><label for="threshold">Unknown below</label><input type="number" id="threshold"
 min="0" max="1" step="0.05" value="__THRESHOLD__"> top probability</p>
<div class="row">
 <img id="preview" alt="the chosen image">
 <div id="results" data-state="empty"><div id="verdict"></div><div id="bars"></div>
  <div id="error"></div></div>
</div>
<script>
const MODEL = __MODEL__;
let last = null;
const $ = (id) => document.getElementById(id);
async function send(file) {
  last = file;
  $("preview").src = URL.createObjectURL(file);
  $("results").dataset.state = "busy";
  $("error").textContent = "";
  const body = new FormData();
  body.append("file", file);
  const q = new URLSearchParams({top_k: 3, threshold: $("threshold").value || MODEL.threshold});
  try {
    const r = await fetch("/predict?" + q, {method: "POST", body});
    const answer = await r.json();
    if (!r.ok) throw new Error(answer.error || r.statusText);
    show(answer);
    $("results").dataset.state = "done";
  } catch (e) {
    $("verdict").textContent = ""; $("bars").textContent = "";
    $("error").textContent = e.message;
    $("results").dataset.state = "error";
  }
}
function show(answer) {
  const v = $("verdict");
  v.className = answer.unknown ? "unknown" : "";
  v.textContent = answer.unknown
    ? "unknown (top probability under " + answer.threshold + ")" : answer.label;
  const bars = $("bars");
  bars.textContent = "";
  for (const p of answer.predictions) {
    const div = document.createElement("div");
    div.className = "pred";
    div.dataset.name = p.name; div.dataset.probability = p.probability;
    const pct = (100 * p.probability).toFixed(1) + "%";
    div.innerHTML = '<span class="name"></span> <span class="pct"></span>' +
      '<div class="bar"><div class="fill"></div></div>';
    div.querySelector(".name").textContent = p.name;
    div.querySelector(".pct").textContent = pct;
    div.querySelector(".fill").style.width = pct;
    bars.appendChild(div);
  }
}
$("file").addEventListener("change", (e) => { if (e.target.files[0]) send(e.target.files[0]); });
$("threshold").addEventListener("change", () => { if (last) send(last); });
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault(); drop.classList.remove("over");
  if (e.dataTransfer.files[0]) send(e.dataTransfer.files[0]);
});
</script>
</body></html>
"""


def page(model: dict[str, Any]) -> str:
    """The page for the model that `GET /model` describes."""
    study = model.get("study") or "exported model"
    title = f"{study}: trial {model.get('trial')}" if model.get("trial") is not None else study
    if model.get("kind") == "ensemble":
        title = f"{study}: ensemble of {len(model['members'])} trials"
    classes = model["classes"]
    shown = ", ".join(classes[:12]) + (", ..." if len(classes) > 12 else "")
    subtitle = (f"{len(classes)} classes ({shown}); input {model['input']['height']}x"
                f"{model['input']['width']} {model['preprocessing']['mode']}; runtime"
                f" {model['runtime']}")
    # </script> inside a JSON string would end the script element early.
    data = json.dumps({"threshold": model["threshold"], "classes": classes}).replace("</", "<\\/")
    return (_PAGE.replace("__TITLE__", html.escape(title))
            .replace("__SUBTITLE__", html.escape(subtitle))
            .replace("__THRESHOLD__", html.escape(str(model["threshold"])))
            .replace("__MODEL__", data))
