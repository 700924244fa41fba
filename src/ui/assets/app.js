// The dashboard's only script: calls the JSON API with the page's CSRF token, follows a run's
// Server-Sent Events, and drives the wizard. No framework, nothing fetched from elsewhere.
"use strict";

const csrf = document.querySelector('meta[name="csrf-token"]').content;
const $ = (selector) => document.querySelector(selector);
const $$ = (selector) => Array.from(document.querySelectorAll(selector));

async function api(method, url, body) {
  const response = await fetch(url, {
    method,
    headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  let data = {};
  try { data = await response.json(); } catch (_) { /* an empty body */ }
  if (!response.ok) {
    const error = new Error(data.error || response.statusText);
    error.data = data;
    throw error;
  }
  return data;
}

function cell(row, text) {
  const td = document.createElement("td");
  td.textContent = text;
  row.appendChild(td);
  return td;
}

// Datasets: upload with a progress bar; every problem with its line and field.
function datasetsPage() {
  $("#upload-button").addEventListener("click", () => {
    const file = $("#upload-file").files[0];
    if (!file) { $("#upload-status").textContent = "choose a .jsonl file first"; return; }
    const bar = $("#upload-progress");
    bar.hidden = false;
    bar.value = 0;
    $("#upload-problems").replaceChildren();
    const request = new XMLHttpRequest();
    request.open("POST", "/api/datasets?name=" + encodeURIComponent(file.name));
    request.setRequestHeader("X-CSRF-Token", csrf);
    request.upload.onprogress = (e) => { if (e.lengthComputable) bar.value = (100 * e.loaded) / e.total; };
    request.onload = () => {
      let data = {};
      try { data = JSON.parse(request.responseText); } catch (_) { data = { error: request.statusText }; }
      if (request.status === 201) {
        bar.value = 100;
        $("#upload-status").textContent = `accepted: ${data.usable} usable rows`;
        window.location.href = "/datasets/" + data.id;
        return;
      }
      $("#upload-status").textContent = data.error || `upload failed (${request.status})`;
      if (data.problems) {
        const table = document.createElement("table");
        table.id = "problem-table";
        const head = table.insertRow();
        ["line", "field", "severity", "problem"].forEach((h) => cell(head, h));
        for (const problem of data.problems) {
          const row = table.insertRow();
          row.className = problem.severity;
          cell(row, problem.line || "");
          cell(row, problem.field || "");
          cell(row, problem.severity);
          cell(row, problem.message);
        }
        $("#upload-problems").appendChild(table);
      }
    };
    request.onerror = () => { $("#upload-status").textContent = "upload failed: connection lost"; };
    request.send(file);
  });
}

// Runs: the list refreshes itself; pick two to compare; queue a project recipe.
function runsPage() {
  const picks = () => $$(".compare-pick:checked").map((c) => c.value);
  $$(".compare-pick").forEach((box) => box.addEventListener("change", () => {
    $("#compare-button").disabled = picks().length !== 2;
  }));
  $("#compare-button").addEventListener("click", () => {
    const [b, a] = picks();
    window.location.href = `/compare?a=${a}&b=${b}`;
  });
  $$(".queue-recipe").forEach((button) => button.addEventListener("click", async () => {
    try {
      const { id } = await api("POST", "/api/runs", { recipe: button.dataset.recipe });
      window.location.href = "/runs/" + id;
    } catch (error) {
      $("#queue-status").textContent = (error.data && error.data.diagnostic) || error.message;
    }
  }));
  const known = $$("#run-list tr[data-run]").length;
  setInterval(async () => {
    const { runs } = await api("GET", "/api/runs");
    if (runs.length !== known) { window.location.reload(); return; }
    for (const { run, current } of runs) {
      const row = $(`#run-list tr[data-run="${run.id}"]`);
      if (!row) continue;
      const status = row.querySelector(".status");
      status.textContent = run.status;
      status.className = "status " + run.status;
      row.querySelector(".stage").textContent = current ? current.stage : "";
      row.querySelector(".progress").textContent =
        current && current.total ? `${current.done}/${current.total}` : "";
    }
  }, 1500);
}

// A run: live stages, loss curve and log from its events; cancel, rerun, compare.
function runPage() {
  const actions = $(".actions");
  const id = actions.dataset.run;
  const status = $("#run-status");
  $("#cancel-button").addEventListener("click", async () => {
    const { status: now } = await api("POST", `/api/runs/${id}/cancel`);
    status.textContent = now;
    status.className = "status " + now;
  });
  $("#rerun-button").addEventListener("click", async () => {
    const { id: next } = await api("POST", `/api/runs/${id}/rerun`);
    window.location.href = "/runs/" + next;
  });
  const compare = $("#compare-with-button");
  if (compare) {
    compare.addEventListener("click", () => {
      window.location.href = `/compare?a=${$("#compare-with").value}&b=${id}`;
    });
  }
  if (status.dataset.finished === "true") return;

  const losses = [];
  function stageRow(stage) {
    let row = $(`#stages tr[data-stage="${stage}"]`);
    if (!row) {
      row = $("#stages").insertRow();
      row.dataset.stage = stage;
      cell(row, stage);
      cell(row, "pending").className = "state pending";
      const td = cell(row, "");
      td.innerHTML = '<progress max="1" value="0"></progress> <span class="count"></span>';
      cell(row, "").className = "detail";
      cell(row, "").className = "seconds";
    }
    return row;
  }
  function setState(row, state) {
    const td = row.querySelector(".state");
    td.textContent = state;
    td.className = "state " + state;
    if (state === "done" || state === "cached") {
      const bar = row.querySelector("progress");
      bar.value = bar.max;
    }
  }
  function drawLoss() {
    $("#loss-figure").hidden = false;
    const max = Math.max(...losses.map((p) => p[1]));
    const min = Math.min(...losses.map((p) => p[1]));
    const last = losses[losses.length - 1][0] || 1;
    const points = losses.map(([step, loss]) =>
      `${(590 * step) / last + 5},${150 - (140 * (loss - min)) / (max - min || 1)}`);
    $("#loss-line").setAttribute("points", points.join(" "));
  }
  let first = true;
  const source = new EventSource(`/runs/${id}/events`);
  source.onmessage = (message) => {
    if (first) { $("#run-log").textContent = ""; first = false; }
    const event = JSON.parse(message.data);
    document.body.dataset.lastEvent = event.type;
    switch (event.type) {
      case "plan":
        event.stages.forEach((s) => stageRow(s.stage));
        break;
      case "stage-skipped":
        setState(stageRow(event.stage), "cached");
        break;
      case "stage-start":
        setState(stageRow(event.stage), "running");
        if (status.textContent === "queued") { status.textContent = "running"; status.className = "status running"; }
        break;
      case "stage-progress": {
        const row = stageRow(event.stage);
        const bar = row.querySelector("progress");
        bar.max = event.total || 1;
        bar.value = event.total ? event.done : 0;
        row.querySelector(".count").textContent = event.total ? `${event.done}/${event.total}` : `${event.done}`;
        row.querySelector(".detail").textContent = `${event.label} ${event.message || ""}`;
        const loss = /loss ([0-9.]+)/.exec(event.message || "");
        if (loss) {
          losses.push([event.done, parseFloat(loss[1])]);
          $("#loss-last").textContent = `step ${event.done}: ${event.message}`;
          drawLoss();
        }
        break;
      }
      case "stage-note":
      case "waiting": {
        const text = event.type === "waiting"
          ? `waiting for another run on this workdir (pid ${event.pid})` : `${event.stage}: ${event.message}`;
        $("#run-log").textContent += text + "\n";
        break;
      }
      case "stage-done": {
        const row = stageRow(event.stage);
        setState(row, "done");
        row.querySelector(".seconds").textContent = `${event.seconds.toFixed(1)} s`;
        break;
      }
      case "stage-failed":
        setState(stageRow(event.stage), "failed");
        $("#run-message").textContent = `${event.stage}: ${event.message}`;
        break;
      case "diagnostic":
        $("#run-message").textContent = event.diagnostic.message || "the run failed";
        break;
      default:
        break;
    }
  };
  source.addEventListener("end", (message) => {
    source.close();
    status.textContent = message.data;
    status.className = "status " + message.data;
    // The report, the rerun button and the final message come with the page.
    window.location.reload();
  });
}

// Seconds and bytes as `ragd-pipe plan` writes them.
function duration(seconds) {
  const s = Math.round(seconds);
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.round(s / 60)} min`;
  return `${Math.floor(s / 3600)} h ${String(Math.round((s % 3600) / 60)).padStart(2, "0")} min`;
}
function memory(bytes) {
  const gib = bytes / 2 ** 30;
  return gib >= 1 ? `${gib.toFixed(1)} GiB` : `${Math.round(bytes / 2 ** 20)} MiB`;
}
const BASIS = {
  measured: "measured by earlier runs on this machine",
  calibrated: "this machine's kernels timed at the recipe's shapes",
  rough: "rough: the developers' figures scaled to this machine's cores",
};

// The review's estimate: one row per stage that will run, then the total.
function showEstimate(estimate, problem) {
  const body = $("#estimate tbody");
  body.replaceChildren();
  if (!estimate) {
    $("#estimate-total").textContent = problem ? `No estimate: ${problem}` : "";
    return;
  }
  for (const line of estimate.stages) {
    const row = document.createElement("tr");
    row.dataset.stage = line.stage;
    const cells = line.estimate
      ? [line.stage, duration(line.estimate.seconds), memory(line.estimate.peak_bytes)]
      : [line.stage, line.problem ? "?" : "cached", line.problem || ""];
    for (const text of cells) {
      const cell = document.createElement("td");
      cell.textContent = text;
      row.append(cell);
    }
    body.append(row);
  }
  const nothing = estimate.stages.every((line) => !line.estimate && !line.problem);
  $("#estimate-total").textContent = nothing
    ? "Nothing to run: every stage's work is in the store."
    : `About ${duration(estimate.seconds)} in all, at most ${memory(estimate.peak_bytes)} of memory (${BASIS[estimate.basis]}).`;
}

// The wizard: data, base model, preset, review (the recipe, editable), launch.
function wizardPage() {
  const show = (step) => {
    $$(".step").forEach((s) => { s.hidden = s.dataset.step !== String(step); });
    $$(".steps li").forEach((li) => li.classList.toggle("current", li.dataset.step === String(step)));
    $("#wizard-error").textContent = "";
  };
  const preset = new URLSearchParams(window.location.search).get("dataset");
  if (preset) {
    $('input[name="data-kind"][value="dataset"]').checked = true;
    $("#dataset-id").value = preset;
  }
  const choices = () => {
    const kind = $('input[name="data-kind"]:checked').value;
    const data = kind === "folder"
      ? { kind, path: $("#folder-path").value, labelled: $("#labelled-path").value || null }
      : { kind, id: Number($("#dataset-id").value) };
    return {
      name: $("#run-name").value.trim(),
      data,
      base_model: $("#base-model").value,
      preset: $('input[name="preset"]:checked').value,
    };
  };
  $("#next-1").addEventListener("click", () => {
    const c = choices();
    if (c.data.kind === "folder" && !c.data.path.trim()) {
      $("#wizard-error").textContent = "give the folder of your documents";
      return;
    }
    if (!c.name) { $("#wizard-error").textContent = "give the run a name"; return; }
    show(2);
  });
  $("#next-2").addEventListener("click", () => show(3));
  $("#next-3").addEventListener("click", async () => {
    try {
      const review = await api("POST", "/api/wizard/review", choices());
      $("#recipe-text").value = review.text;
      $("#recipe-problem").textContent = review.problem ? review.problem.diagnostic : "";
      showEstimate(review.estimate, review.estimate_problem);
      show(4);
    } catch (error) {
      $("#wizard-error").textContent = error.message;
    }
  });
  $("#save-recipe").addEventListener("click", () => {
    const blob = new Blob([$("#recipe-text").value], { type: "text/yaml" });
    $("#save-recipe").href = URL.createObjectURL(blob);
    $("#save-recipe").download = `${choices().name}.yaml`;
  });
  $("#launch").addEventListener("click", async () => {
    try {
      const { id } = await api("POST", "/api/runs", { text: $("#recipe-text").value, name: choices().name });
      window.location.href = "/runs/" + id;
    } catch (error) {
      $("#recipe-problem").textContent = (error.data && error.data.diagnostic) || error.message;
    }
  });
  show(1);
}

// Models: make one ragd's default (naming the re-index it implies), delete.
function modelsPage() {
  $$(".use-model").forEach((button) => button.addEventListener("click", async () => {
    const row = button.closest("tr");
    const name = row.dataset.model;
    const question = row.dataset.role === "reranker"
      ? `Make ${name} ragd's reranker?\n\nNo re-index: a reranker only reorders what search finds.`
      : `Make ${name} ragd's embedding model?\n\nragd must then re-index: every document in its index is embedded again with ${name}, since vectors of the old model do not match the new one. Searches use the new model once that is done.`;
    const worse = row.dataset.regression === "true"
      ? `\n\nWarning: its evaluation found it worse than its base model.` : "";
    if (!window.confirm(question + worse)) return;
    try {
      await api("POST", `/api/models/${encodeURIComponent(name)}/use`);
      window.location.reload();
    } catch (error) {
      $("#model-status").textContent = error.message;
    }
  }));
  $$(".delete-model").forEach((button) => button.addEventListener("click", async () => {
    const name = button.closest("tr").dataset.model;
    if (!window.confirm(`Delete ${name} from the registry? Its folder is removed.`)) return;
    try {
      await api("DELETE", `/api/models/${encodeURIComponent(name)}`);
      window.location.reload();
    } catch (error) {
      $("#model-status").textContent = error.message;
    }
  }));
}

const pages = { datasets: datasetsPage, runs: runsPage, run: runPage, wizard: wizardPage, models: modelsPage };
const page = pages[document.body.dataset.page];
if (page) page();
