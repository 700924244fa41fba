// Drives the dashboard in a real Chromium (playwright-core): upload a broken and a good
// dataset, launch a run with the wizard, see progress arrive, cancel, resume, see the report,
// make the model ragd's default, compare two runs. Screenshots of each page go to SHOTS.
//
// node flow.mjs URL PROJECT_DIR SHOTS_DIR   (PLAYWRIGHT_CORE: the playwright-core module path,
// CHROMIUM: the browser binary). Exits non-zero with the failed step on stderr.
import { createRequire } from "node:module";
import path from "node:path";


const [url, project, shots] = process.argv.slice(2);
const require = createRequire(import.meta.url);
const { chromium } = require(process.env.PLAYWRIGHT_CORE);

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM,
  args: ["--no-sandbox", "--disable-dev-shm-usage"],
});
const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
page.setDefaultTimeout(60_000);
const dialogs = [];
page.on("dialog", async (dialog) => { dialogs.push(dialog.message()); await dialog.accept(); });
page.on("pageerror", (error) => { console.error("page error:", error.message); process.exitCode = 1; });

let step = "start";
const shot = async (name) => page.screenshot({ path: path.join(shots, name + ".png"), fullPage: true });
const expect = (condition, message) => { if (!condition) throw new Error(`${step}: ${message}`); };
const log = (text) => console.log(`[ui flow] ${text}`);

async function waitForStatus(statuses, timeout) {
  await page.waitForFunction(
    (wanted) => wanted.includes(document.querySelector("#run-status")?.textContent),
    statuses, { timeout, polling: 250 });
  return page.textContent("#run-status");
}

async function wizardRun(name, edit, cached = false) {
  await page.goto(url + "/runs/new");
  await page.fill("#folder-path", "examples/docs");
  await page.fill("#labelled-path", "examples/labelled");
  await page.fill("#run-name", name);
  await page.click("#next-1");
  await page.click("#next-2");
  await page.check('input[name="preset"][value="quick"]');
  await page.click("#next-3");
  await page.waitForSelector("#recipe-text:visible");
  const recipe = await page.inputValue("#recipe-text");
  expect(recipe.includes("strategies: [ict]") && recipe.includes("max_steps: 8"), "the quick preset's recipe: " + recipe);
  // The estimate `ragd-pipe plan` makes: a time and a memory figure for training, or, when the
  // same recipe already ran, that its work is in the store.
  const train = await page.textContent('#estimate tr[data-stage="train"]');
  const estimated = /\d+ (s|min)/.test(train) && /\d+(\.\d)? (MiB|GiB)/.test(train);
  expect(cached ? train.includes("cached") : estimated, "the train stage's estimate: " + train);
  expect((await page.textContent("#estimate-total")).startsWith("About "), "the estimate's total");
  if (edit) await page.fill("#recipe-text", edit(recipe));
  return recipe;
}

try {
  step = "overview";
  await page.goto(url + "/");
  await shot("overview");

  step = "upload a broken dataset";
  await page.goto(url + "/datasets");
  await page.setInputFiles("#upload-file", path.join(project, "broken.jsonl"));
  await page.click("#upload-button");
  await page.waitForSelector("#problem-table");
  const problems = await page.textContent("#problem-table");
  expect(problems.includes("65") && problems.includes("positive"), "the row and field of the error: " + problems);
  await shot("datasets-invalid");
  log("the broken dataset's row error is shown");

  step = "upload a good dataset";
  await page.setInputFiles("#upload-file", path.join(project, "tidewater.jsonl"));
  await page.click("#upload-button");
  await page.waitForURL(/\/datasets\/\d+$/);
  expect((await page.textContent("main")).includes("64 usable rows"), "the dataset's statistics");
  await shot("dataset");

  step = "wizard";
  await wizardRun("docs-a");
  await shot("wizard-review");
  await page.click("#launch");
  await page.waitForURL(/\/runs\/\d+$/);
  const firstRun = page.url().split("/").pop();

  step = "live progress";
  // Progress of a stage after the first, so that the rerun has a finished stage to reuse.
  await page.waitForFunction(
    () => document.body.dataset.lastEvent === "stage-progress" && document.querySelector("#stages td.state.done"),
    null, { timeout: 180_000, polling: 100 });
  log("a progress event arrived");
  await shot("run-live");

  step = "cancel";
  await page.click("#cancel-button");
  const cancelled = await waitForStatus(["cancelled", "done", "failed"], 120_000);
  expect(cancelled === "cancelled", "the run stops as cancelled, not " + cancelled);
  await shot("run-cancelled");
  log("the run was cancelled");

  step = "resume";
  await page.click("#rerun-button");
  await page.waitForURL((u) => !u.pathname.endsWith("/" + firstRun));
  const resumed = await waitForStatus(["done", "failed", "cancelled"], 600_000);
  expect(resumed === "done", "the resumed run finishes: " + (await page.textContent("#run-message")));
  const states = await page.$$eval("#stages td.state", (cells) => cells.map((c) => c.textContent));
  expect(states.includes("cached"), "the rerun reuses finished stages: " + states.join(", "));
  await page.waitForSelector("#report");
  const report = page.frameLocator("#report");
  await report.locator("h1").waitFor();
  await shot("run-report");
  const secondRun = page.url().split("/").pop();
  log(`run ${secondRun} resumed run ${firstRun} and shows its report`);

  step = "make default";
  await page.goto(url + "/models");
  await shot("models");
  await page.click('tr[data-model="docs-a"] .use-model');
  await page.waitForSelector('tr[data-model="docs-a"] .default-badge');
  expect(dialogs.some((d) => d.includes("re-index")), "the confirmation names the re-index: " + dialogs.join(" | "));
  step = "delete the default";
  await page.click('tr[data-model="docs-a"] .delete-model');
  await page.waitForFunction(() => document.querySelector("#model-status").textContent.includes("default"));
  await shot("models-default");
  log("docs-a is ragd's default and cannot be deleted");

  step = "second run";
  // Reviewed as docs-a's recipe, whose work is in the store; the edit then changes the seed.
  await wizardRun("docs-b", (recipe) => recipe.replace("seed: 7", "seed: 8"), true);
  await page.click("#launch");
  await page.waitForURL(/\/runs\/\d+$/);
  const third = await waitForStatus(["done", "failed", "cancelled"], 600_000);
  expect(third === "done", "the second run finishes: " + (await page.textContent("#run-message")));
  const thirdRun = page.url().split("/").pop();

  step = "compare";
  await page.goto(url + "/runs");
  await shot("runs");
  await page.check(`.compare-pick[value="${secondRun}"]`);
  await page.check(`.compare-pick[value="${thirdRun}"]`);
  await page.click("#compare-button");
  await page.waitForURL(/\/compare\?/);
  const differ = await page.textContent("#differ");
  expect(differ.includes("seed") && differ.includes("name"), "the values that differ: " + differ);
  const deltas = await page.textContent("#metric-deltas");
  expect(deltas.includes("nDCG@10"), "metric deltas: " + deltas);
  await shot("compare");
  log("two runs compared");

  step = "overview at the end";
  await page.goto(url + "/");
  await shot("overview");
} catch (error) {
  console.error(`[ui flow] failed at ${step}: ${error.message}`);
  try { await shot("failure"); } catch (_) { /* the page may be gone */ }
  process.exitCode = 1;
} finally {
  await browser.close();
}
