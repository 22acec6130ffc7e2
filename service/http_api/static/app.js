// The page at /: lists the models (GET /v1/models), translates with POST /v1/translate:stream (server-sent
// events: tokens as they are decoded, then the final result with its n-best and attention), and draws the
// attention of the best hypothesis as a table, source tokens across and target tokens down.
"use strict";

const $ = (id) => document.getElementById(id);
let models = [];

function headers() {
  const result = { "Content-Type": "application/json" };
  const token = $("token").value.trim();
  if (token) result.Authorization = "Bearer " + token;
  return result;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
}

async function failure(response) {
  // Every error body of the server is {"error": ..., "code": ...}.
  let detail = response.statusText;
  try {
    const body = await response.json();
    detail = body.error + (body.code ? " (" + body.code + ")" : "");
  } catch (ignored) {
    // not JSON: keep the status text
  }
  return "HTTP " + response.status + ": " + detail;
}

function fillBeams() {
  const model = models.find((entry) => entry.name === $("model").value);
  const widest = model ? model.limits.topK : 1;
  const current = Number($("beam").value) || 1;
  $("beam").replaceChildren();
  for (const beam of [1, 2, 4, 8, 16].filter((width) => width <= widest)) {
    const option = new Option(beam === 1 ? "1 (greedy, streams tokens)" : String(beam), String(beam));
    $("beam").add(option);
  }
  $("beam").value = String(Math.min(current, widest));
  $("model-task").textContent = model ? model.task.description || "" : "";
}

async function loadModels() {
  const response = await fetch("/v1/models", { headers: headers() });
  if (!response.ok) {
    showError("Cannot list the models: " + (await failure(response)));
    return;
  }
  const listing = await response.json();
  models = listing.models;
  $("model").replaceChildren(...models.map((model) => new Option(model.name, model.name)));
  $("model").value = listing.defaultModel;
  fillBeams();
}

function drawHeatmap(hypothesis) {
  const source = hypothesis.sourceTokens;
  const target = hypothesis.targetTokens;
  const weights = hypothesis.attention;
  const table = $("heatmap");
  table.replaceChildren();
  const head = table.createTHead().insertRow();
  head.appendChild(document.createElement("th"));
  for (const token of source) {
    const cell = document.createElement("th");
    const label = document.createElement("span");
    label.textContent = token;
    cell.appendChild(label);
    head.appendChild(cell);
  }
  const body = table.createTBody();
  target.forEach((token, row) => {
    const line = body.insertRow();
    const label = document.createElement("th");
    label.textContent = token;
    line.appendChild(label);
    source.forEach((sourceToken, column) => {
      const weight = weights[row * source.length + column];
      const cell = line.insertCell();
      cell.className = "cell";
      cell.style.background = "rgba(36, 87, 197, " + weight.toFixed(3) + ")";
      cell.title = token + " <- " + sourceToken + ": " + weight.toFixed(3);
    });
  });
}

function showResult(update) {
  const best = update.hypotheses[0];
  $("translation").textContent = best.text;
  $("score").textContent = best.score.toFixed(4);
  $("served").textContent = update.model + " v" + update.version;
  $("nbest").replaceChildren(
    ...update.hypotheses.map((hypothesis) => {
      const item = document.createElement("li");
      item.textContent = hypothesis.text;
      const score = document.createElement("span");
      score.className = "score";
      score.textContent = hypothesis.score.toFixed(4);
      item.appendChild(score);
      return item;
    }),
  );
  drawHeatmap(best);
}

async function translate(event) {
  event.preventDefault();
  $("error").hidden = true;
  $("result").hidden = true;
  $("result").removeAttribute("data-final");
  $("translate").disabled = true;
  const beam = Number($("beam").value);
  const request = {
    model: $("model").value,
    texts: [$("text").value],
    options: { beamSize: beam, numHypotheses: beam, returnAttention: true },
  };
  try {
    const response = await fetch("/v1/translate:stream", {
      method: "POST",
      headers: headers(),
      body: JSON.stringify(request),
    });
    if (!response.ok) {
      showError(await failure(response));
      return;
    }
    $("translation").textContent = "";
    $("nbest").replaceChildren();
    $("heatmap").replaceChildren();
    $("result").hidden = false;
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffered = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffered += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffered.indexOf("\n\n")) >= 0) {
        handleEvent(buffered.slice(0, end));
        buffered = buffered.slice(end + 2);
      }
    }
  } catch (error) {
    showError("The request failed: " + error.message);
  } finally {
    $("translate").disabled = false;
  }
}

function handleEvent(text) {
  let kind = "message";
  let data = "";
  for (const line of text.split("\n")) {
    if (line.startsWith("event: ")) kind = line.slice(7);
    else if (line.startsWith("data: ")) data += line.slice(6);
  }
  const payload = JSON.parse(data);
  if (kind === "error") {
    showError(payload.error + " (" + payload.code + ")");
  } else if (payload.final) {
    showResult(payload);
    $("result").setAttribute("data-final", "true");
  } else {
    $("translation").textContent = payload.text;
  }
}

$("model").addEventListener("change", fillBeams);
$("form").addEventListener("submit", translate);
loadModels();
